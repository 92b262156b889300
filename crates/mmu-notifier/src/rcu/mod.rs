//! The core's only `unsafe` code, all of it on the RCU read side, one file
//! per concept:
//!
//! * [`srcu`] (also at the crate root): the SRCU grace-period domains, with
//!   [`Backend`], the contract an embedder's reader lookup must keep, and
//!   `tls` (crate-private, std only), the global domain's reader counters
//!   living in thread-locals, read by grace periods under the registry
//!   lock;
//! * `cell.rs`, [`RcuCell`]: a pointer published and retired with RCU
//!   semantics;
//! * `slots.rs`, [`RcuSlots`]: a fixed array of RCU-published `Arc`s with
//!   keys and tags (the read side of a lock-free hash table);
//! * `anchored.rs`, `Anchored` (crate-private): a notifier reached with one
//!   load from the list snapshot, kept alive by the entry that owns it.
//!
//! The pointers depend on the domains, never the other way round.
//!
//! Every `unsafe` block carries its `// SAFETY:` argument.
//!
//! [`RcuCell`] is Linux's `rcu_assign_pointer` / `srcu_dereference` /
//! "`call_srcu`, then free" as a type:
//!
//! * A reader inside a read-side section of the cell's [`Domain`] gets a
//!   plain `&T` with [`RcuCell::read`]: one acquire load, no reference count
//!   and no lock. The reference cannot outlive the section (its lifetime is
//!   the guard's).
//! * Writers take the cell's writer lock ([`RcuCell::lock`]), read the
//!   current value, and [`replace`](RcuWriteGuard::replace) it: the new value
//!   is published with a release store, and the old one is *retired*: it is
//!   freed by a function queued on the domain ([`Domain::call`]), which runs
//!   only after a grace period that began after the replace.
//!
//! # Why this is sound
//!
//! A value is freed at exactly two points: when the cell itself is dropped
//! (exclusive access: no reader can hold a borrow of it), and by the deferred
//! function of a retirement. A reader can only have loaded a retired pointer
//! in a section that began before the replace published its successor
//! (the release store of `replace` and the acquire load of `read`), and the
//! deferred function runs only after a grace period that began after the
//! replace, which waits for every such section ([`Domain`]'s algorithm). The
//! section must be of the *same* domain: `read` checks that, because a
//! section of another domain is invisible to this domain's grace periods.
//!
//! The read side's correctness also rests on each reader counter being used
//! by one context at a time; the std build guarantees that with thread-local
//! readers, an embedder with the [`Backend`] contract. Invalidation pairs
//! use [`RcuCell::enter`], which opens the section on the cell's own domain
//! and keeps it with the reference ([`RcuRef`]), so no domain check is
//! needed there.
//!
//! loom models of publication, of a reader that keeps using the old value
//! while the writer retires it, and of the grace period before the free are
//! in `tests/loom.rs` (`rcu_*`); the shuttle whole-system tests run every
//! hook through this module.
//!
//! [`Domain`]: srcu::Domain
//! [`Domain::call`]: srcu::Domain::call

mod anchored;
mod cell;
mod slots;
pub mod srcu;

pub(crate) use anchored::Anchored;
pub use cell::{RcuCell, RcuRef, RcuWriteGuard};
pub use slots::{RcuSlots, RcuSlotsWriter, SlotEntry, SlotRef, SlotView, SlotsReader, SLOT_TAGS};
pub use srcu::Backend;
