//! The one place concurrency primitives come from.
//!
//! Normal builds use `std`; builds without the `std` feature use `core`'s
//! atomics and the [`spin`](https://docs.rs/spin) crate's locks (the
//! subsystem holds its internal locks only for short, callback-free critical
//! sections; every *wait* for another context goes through the SRCU domain's
//! backend instead, see [`crate::srcu::Backend`]); builds with `RUSTFLAGS="--cfg loom"` use
//! [loom](https://docs.rs/loom)'s model-checked replacements and builds with
//! `RUSTFLAGS="--cfg shuttle"` use [shuttle](https://docs.rs/shuttle)'s
//! randomly scheduled ones, the way tokio and crossbeam structure it. Every
//! lock, atomic, condition variable, thread and thread-local whose
//! interleavings matter to the algorithms of this crate is taken from here,
//! so the loom and shuttle tests check the same code that ships.
//!
//! The facade is public so that the crates built on this one (the software
//! MMU, the reference mirrors, your own secondary MMU) take their primitives
//! from the same place: a shuttle test then schedules the whole system, and a
//! `std::sync::Mutex` hidden in one of them cannot block the single OS thread
//! shuttle runs every task on.
//!
//! `std::sync::Arc` is *not* routed through the facade: reference counts of
//! user objects play no part in any of the grace-period or ordering arguments,
//! and loom's `Arc` cannot hold unsized trait objects.
//!
//! ```
//! use mmu_notifier::sync::{self, AtomicU64, Mutex, Ordering};
//! let hits = AtomicU64::new(0);
//! let table = Mutex::new(vec![1, 2, 3]);
//! hits.fetch_add(1, Ordering::Relaxed);
//! assert_eq!(sync::lock(&table).len(), 3);
//! ```

pub use crate::primitive::*;

/// The checked mutex of secondary MMUs (also at the crate root).
#[cfg(feature = "std")]
pub use crate::mutex::CheckedMutex;
