//! Linux's MMU-notifier subsystem (`mm/mmu_notifier.c`, v6.6 semantics) as a
//! Rust library.
//!
//! A *primary* MMU (a software model, or this process's address space) calls
//! hooks on the [`Subscriptions`] of an address space whenever it changes
//! mappings; the subsystem fans each hook out to the *secondary* MMUs that
//! subscribed (shadow page tables, device mirrors, secondary TLBs,
//! registration caches), so they drop their copies before a page is reused.
//!
//! * [`MmuNotifier`]: the classic notifier callbacks (Linux
//!   `mmu_notifier_ops`), registered with [`Subscriptions::register`] /
//!   [`Subscriptions::unregister`] or [`Subscriptions::get`] /
//!   [`Subscriptions::put`].
//! * Hooks for the primary: [`Subscriptions::invalidate_range_start`] (and
//!   the non-blockable variant) returning an [`ActiveInvalidation`] whose
//!   `end` closes the pair, the young-bit hooks, [`Subscriptions::change_pte`],
//!   [`Subscriptions::arch_invalidate_secondary_tlbs`] and
//!   [`Subscriptions::release`] (exit).
//! * [`IntervalNotifier`]: per-range callbacks with the collision-retry
//!   sequence (Linux `mmu_interval_notifier`), inserted with
//!   [`Subscriptions::interval_insert`]; see the `interval` module docs.
//!   [`DriverLock`] is the user lock of its collision-retry protocol, with
//!   the protocol in its methods.
//! * [`srcu`]: the sleepable grace-period domain callbacks run under.
//! * [`debug`]: lockdep-style checks and the diagnostic counters.
//!
//! The read side (every hook) takes no lock and performs no shared
//! read-modify-write; see the `subscriptions` and `list` module docs for the
//! locking scheme.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod barrier;
pub mod debug;
mod driver_lock;
mod error;
mod interval;
mod itree;
mod list;
mod mutex;
mod notifier;
mod range;
mod registration;
pub mod srcu;
mod subscriptions;
pub mod sync;

pub use debug::{might_sleep, Diagnostics, Warning};
pub use driver_lock::DriverLock;
pub use error::Error;
pub use interval::{IntervalNotifier, IntervalOps};
pub use mutex::CheckedMutex;
pub use notifier::{Again, Callbacks, MmuNotifier, NotifierAlloc, Pte};
pub use range::{Event, Owner, Range, RangeError, END_OF_ADDRESS_SPACE, PAGE_SIZE};
pub use registration::{synchronize, NotifierHandle};
pub use subscriptions::{ActiveInvalidation, MmapReadGuard, MmapWriteGuard, Subscriptions};
