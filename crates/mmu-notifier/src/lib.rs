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
//!   `mmu_notifier_ops`), registered with [`SubscriptionsRef::register`] /
//!   [`SubscriptionsRef::unregister`] or [`SubscriptionsRef::get`] /
//!   [`SubscriptionsRef::put`].
//! * Hooks for the primary: [`Subscriptions::invalidate_range_start`] (and
//!   the non-blockable variant) returning an [`ActiveInvalidation`] whose
//!   `end` closes the pair, the young-bit hooks, [`Subscriptions::change_pte`],
//!   [`Subscriptions::arch_invalidate_secondary_tlbs`] and
//!   [`Subscriptions::release`] (exit).
//! * [`IntervalNotifier`]: per-range callbacks with the collision-retry
//!   sequence (Linux `mmu_interval_notifier`), inserted with
//!   [`SubscriptionsRef::interval_insert`]; see the `interval` module docs.
//!   `DriverLock` (std) is the user lock of its collision-retry protocol, with
//!   the protocol in its methods.
//! * [`srcu`]: the sleepable grace-period domain callbacks run under.
//! * [`debug`]: lockdep-style checks and the diagnostic counters.
//!
//! The read side (every hook) takes no lock and performs no shared
//! read-modify-write: the notifier list sits behind an RCU pointer
//! ([`rcu::RcuCell`]) dereferenced inside the SRCU read-side section the
//! callbacks run in, as in Linux. See the `subscriptions` and `list` module
//! docs for the locking scheme.
//!
//! # Without std
//!
//! The crate is `#![no_std]` + `alloc` with `default-features = false`, for
//! Rust kernels, unikernels and hypervisors. What std supplied becomes the
//! embedder's [`srcu::Backend`]: which reader (a counter registered by hand
//! with [`srcu::Domain::register_reader`], one per task) the calling context
//! owns, how a context waits for another (the backend's `relax`: yield to a
//! scheduler, pause), and the read side's fence pair. The SRCU domain is a
//! value ([`srcu::Domain::with_backend`]) that each address space is created
//! with ([`Subscriptions::with_domain`]). Internal locks are spin locks held
//! only for short sections that call no callback. Without std there is no
//! `catch_unwind` (a panicking callback is not contained; with std it is
//! contained only under `panic = "unwind"`), and no `CheckedMutex` /
//! `DriverLock` (they wrap std's mutex). The debug checks (`might_sleep` in
//! a non-blockable callback, recursion) keep their state in a
//! [`debug::DebugContext`] per task: the embedder keeps one per task or CPU
//! and installs a [`debug::ContextSource`] that finds the caller's
//! ([`debug::set_context_source`]); until it does, they are off (the counted
//! warnings stay).
//! `crates/embed` in the repository is a complete embedding: a backend with
//! readers registered by hand per CPU and a spin-wait, driving a shadow-MMU
//! notifier under a spin lock.
//!
//! ```toml
//! [dependencies]
//! mmu-notifier = { version = "0.1", default-features = false }
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(feature = "std")]
mod barrier;
pub mod debug;
#[cfg(feature = "std")]
mod driver_lock;
mod error;
mod interval;
mod itree;
mod list;
#[cfg(feature = "std")]
mod mutex;
mod notifier;
mod primitive;

/// The shuttle crate, for the facade's macros expanded in other crates.
#[cfg(shuttle)]
#[doc(hidden)]
pub use shuttle as __shuttle;

/// The loom crate, for the facade's macros expanded in other crates.
#[cfg(loom)]
#[doc(hidden)]
pub use loom as __loom;
mod range;
// The one module allowed `unsafe`: the SRCU domain with its reader contract
// and thread-local counters, and the RCU pointers it protects.
#[allow(unsafe_code)]
pub mod rcu;
mod registration;
pub use rcu::srcu;
mod subscriptions;
pub mod sync;

pub use debug::{might_sleep, Diagnostics, Warning};
#[cfg(feature = "std")]
pub use driver_lock::DriverLock;
pub use error::Error;
pub use interval::{IntervalNotifier, IntervalOps};
#[cfg(feature = "std")]
pub use mutex::CheckedMutex;
pub use notifier::{Again, Callbacks, MmuNotifier, NotifierAlloc, PteValue};
pub use range::{Event, Owner, Range, RangeError, END_OF_ADDRESS_SPACE, PAGE_SIZE};
#[cfg(feature = "std")]
pub use registration::synchronize;
pub use registration::NotifierHandle;
pub use subscriptions::{
    ActiveInvalidation, MmapReadGuard, MmapWriteGuard, Subscriptions, SubscriptionsRef,
};
