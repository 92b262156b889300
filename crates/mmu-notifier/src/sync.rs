//! The one place concurrency primitives come from.
//!
//! Normal builds use `std`; builds with `RUSTFLAGS="--cfg loom"` use
//! [loom](https://docs.rs/loom)'s model-checked replacements, the way tokio and
//! crossbeam structure it. Every lock, atomic, condition variable, thread and
//! thread-local whose interleavings matter to the algorithms of this crate is
//! taken from here, so the loom tests check the same code that ships.
//!
//! `std::sync::Arc` is *not* routed through the facade: reference counts of
//! user objects play no part in any of the grace-period or ordering arguments,
//! and loom's `Arc` cannot hold unsized trait objects.

#[cfg(loom)]
pub(crate) use loom::{
    sync::{
        atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    thread,
};

#[cfg(not(loom))]
pub(crate) use std::{
    sync::{
        atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    thread,
};

/// `thread_local!` from std, or loom's model-checked version.
#[cfg(loom)]
macro_rules! facade_thread_local {
    ($($t:tt)*) => { loom::thread_local!($($t)*); };
}
#[cfg(not(loom))]
macro_rules! facade_thread_local {
    ($($t:tt)*) => { std::thread_local!($($t)*); };
}
pub(crate) use facade_thread_local as thread_local;

/// Locks a mutex, ignoring poisoning (as do [`read`], [`write`] and [`wait`]).
///
/// Every critical section in this crate keeps its data consistent at every
/// await-free step and never runs user callbacks while holding a lock it
/// writes under (the interval tree's shared guard is held across callbacks,
/// but only for reading, and each callback's panic is caught), so a panic
/// cannot leave the protected state half-updated.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes a shared guard of an `RwLock`, ignoring poisoning.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Takes the exclusive guard of an `RwLock`, ignoring poisoning.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Waits on a condition variable, ignoring poisoning.
pub(crate) fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|p| p.into_inner())
}

/// Short pause used by wait loops: a yield point under loom, a spin hint or a
/// sleep with exponential back-off otherwise.
pub(crate) struct Backoff {
    #[cfg_attr(loom, allow(dead_code))]
    step: u32,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { step: 0 }
    }

    /// Waits a little longer each call: spins, then yields, then sleeps up to 1 ms.
    pub(crate) fn snooze(&mut self) {
        #[cfg(loom)]
        {
            thread::yield_now();
        }
        #[cfg(not(loom))]
        {
            if self.step < 6 {
                for _ in 0..(1u32 << self.step) {
                    std::hint::spin_loop();
                }
            } else if self.step < 10 {
                thread::yield_now();
            } else {
                let micros = 1u64 << (self.step - 10).min(10);
                thread::sleep(std::time::Duration::from_micros(micros));
            }
            self.step = self.step.saturating_add(1);
        }
    }
}
