//! A blocking mutex for notifier implementations that knows it blocks.

use crate::sync;

/// A mutex whose [`lock`](Mutex::lock) declares that it may sleep
/// ([`crate::might_sleep`]), so taking it inside a non-blockable invalidation
/// callback is reported in debug builds; use [`try_lock`](Mutex::try_lock)
/// there (Linux: `mutex_lock` vs `mutex_trylock` in HMM drivers).
///
/// Poisoning is ignored: a panic in a callback is caught and reported by the
/// core, and the data stays usable.
///
/// ```
/// use mmu_notifier::Mutex;
/// let m = Mutex::new(5);
/// *m.lock() += 1;
/// assert_eq!(*m.try_lock().unwrap(), 6);
/// ```
#[derive(Debug, Default)]
pub struct Mutex<T> {
    inner: sync::Mutex<T>,
}

/// Guard of a [`Mutex`].
pub type MutexGuard<'a, T> = sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Self {
        Mutex {
            inner: sync::Mutex::new(value),
        }
    }

    /// Locks, sleeping if needed.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        crate::debug::might_sleep();
        sync::lock(&self.inner)
    }

    /// Locks if that needs no waiting.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.inner.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Consumes the mutex, returning the data.
    pub fn into_inner(self) -> T {
        match self.inner.into_inner() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        }
    }
}
