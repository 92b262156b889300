//! The driver-lock rule of spec 8.2 step 2, shared by the interval
//! callbacks: `lock()` in a blockable invalidation, `try_lock()` otherwise
//! (the callback then returns false, which fails the invalidation with
//! `Again` instead of sleeping).

use std::sync::TryLockError;

use mmu_notifier::sync::{self, Mutex, MutexGuard};

use mmu_notifier::Range;

/// The guard of `m` for an invalidation of `r`, or `None` when `r` is not
/// blockable and the lock is taken.
pub(crate) fn lock_for<'a, T>(m: &'a Mutex<T>, r: &Range) -> Option<MutexGuard<'a, T>> {
    if r.blockable() {
        return Some(sync::lock(m));
    }
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}
