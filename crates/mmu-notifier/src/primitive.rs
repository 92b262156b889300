//! The primitives behind the [`sync`](crate::sync) facade: std's, loom's,
//! shuttle's or (without std) `core`'s atomics and the `spin` crate's
//! locks, the `thread_local!` of each, and the poison-ignoring lock helpers.
//! A module of its own below everything else, so that the checked mutex and
//! the debug checks, which the facade also offers, build on it without an
//! import circle; everything else takes these through `sync`.

#[cfg(all(any(loom, shuttle), not(feature = "std")))]
compile_error!("the loom and shuttle builds need the `std` feature");

#[cfg(loom)]
pub use loom::{
    sync::{
        atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    thread,
};

#[cfg(shuttle)]
pub use shuttle::{
    sync::{
        atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    thread,
};

#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub use std::{
    sync::{
        atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    thread,
};

#[cfg(not(feature = "std"))]
pub use core::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
#[cfg(not(feature = "std"))]
pub use spin::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `thread_local!` from std, or loom's or shuttle's version (one value per
/// modelled thread). Use it as `mmu_notifier::sync::thread_local!`.
#[cfg(loom)]
#[doc(hidden)]
#[macro_export]
macro_rules! __facade_thread_local {
    ($($t:tt)*) => { $crate::__loom::thread_local!($($t)*); };
}
/// `thread_local!` from std, or loom's or shuttle's version (one value per
/// modelled thread). Use it as `mmu_notifier::sync::thread_local!`.
#[cfg(shuttle)]
#[doc(hidden)]
#[macro_export]
macro_rules! __facade_thread_local {
    ($($t:tt)*) => { $crate::__shuttle::thread_local!($($t)*); };
}
/// `thread_local!` from std, or loom's or shuttle's version (one value per
/// modelled thread). Use it as `mmu_notifier::sync::thread_local!`.
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
#[doc(hidden)]
#[macro_export]
macro_rules! __facade_thread_local {
    ($($t:tt)*) => { std::thread_local!($($t)*); };
}
#[cfg(feature = "std")]
pub use crate::__facade_thread_local as thread_local;

/// Locks a mutex, ignoring poisoning (as do [`read`](fn@read), [`write`](fn@write) and, with std, `wait`).
///
/// Every critical section in this crate keeps its data consistent at every
/// await-free step and never runs user callbacks while holding a lock it
/// writes under (the interval tree's shared guard is held across callbacks,
/// but only for reading, and each callback's panic is caught), so a panic
/// cannot leave the protected state half-updated. Callers in other crates make
/// the same argument for their own locks.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(feature = "std")]
    return m.lock().unwrap_or_else(|p| p.into_inner());
    #[cfg(not(feature = "std"))]
    return m.lock();
}

/// Locks a mutex if that needs no waiting, ignoring poisoning.
pub fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    #[cfg(feature = "std")]
    return match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    #[cfg(not(feature = "std"))]
    return m.try_lock();
}

/// Takes a shared guard of an `RwLock`, ignoring poisoning.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    #[cfg(feature = "std")]
    return l.read().unwrap_or_else(|p| p.into_inner());
    #[cfg(not(feature = "std"))]
    return l.read();
}

/// Takes the exclusive guard of an `RwLock`, ignoring poisoning.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    #[cfg(feature = "std")]
    return l.write().unwrap_or_else(|p| p.into_inner());
    #[cfg(not(feature = "std"))]
    return l.write();
}

/// Waits on a condition variable, ignoring poisoning.
#[cfg(feature = "std")]
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|p| p.into_inner())
}

/// Short pause used by wait loops: a yield point under loom and shuttle, a
/// spin hint or a sleep with exponential back-off otherwise.
#[cfg(feature = "std")]
#[derive(Debug, Default)]
pub struct Backoff {
    #[cfg_attr(any(loom, shuttle), allow(dead_code))]
    step: u32,
}

#[cfg(feature = "std")]
impl Backoff {
    /// A back-off at its first (shortest) step.
    pub fn new() -> Self {
        Backoff { step: 0 }
    }

    /// Waits a little longer each call: spins, then yields, then sleeps up to 1 ms.
    pub fn snooze(&mut self) {
        #[cfg(any(loom, shuttle))]
        {
            thread::yield_now();
        }
        #[cfg(not(any(loom, shuttle)))]
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
