//! [`CheckedMutex`]: the mutex of secondary MMUs, which knows when it may
//! sleep.

use crate::primitive as sync;
use crate::range::Range;

/// The lock a secondary MMU protects its translations with, taken through
/// the facade ([`crate::sync`]) and checked against the non-blockable rule:
///
/// * [`lock`](Self::lock) may sleep, and says so ([`crate::might_sleep`]):
///   taken inside a non-blockable invalidation callback it is reported as
///   [`Warning::SleepInNonBlockable`](crate::Warning::SleepInNonBlockable)
///   (debug builds);
/// * [`lock_in_callback`](Self::lock_in_callback) is what an invalidation
///   callback uses: `lock` in a blockable range, only a try otherwise (Linux
///   HMM drivers: `mutex_lock` vs `mutex_trylock`);
/// * [`spin_lock`](Self::spin_lock) never sleeps: it busy-waits, as the
///   spinlocks of KVM (`kvm->mmu_lock`) and IOMMU drivers do, and is allowed
///   in any callback. Keep what it protects short.
///
/// Poisoning is ignored: a panic in a callback is caught and reported by the
/// core, and the data stays usable.
///
/// ```
/// use mmu_notifier::CheckedMutex;
/// let m = CheckedMutex::new(5);
/// *m.lock() += 1;
/// *m.spin_lock() += 1;
/// assert_eq!(*m.try_lock().unwrap(), 7);
/// ```
pub struct CheckedMutex<T> {
    inner: sync::Mutex<T>,
}

impl<T> std::fmt::Debug for CheckedMutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedMutex").finish_non_exhaustive()
    }
}

impl<T: Default> Default for CheckedMutex<T> {
    fn default() -> Self {
        CheckedMutex::new(T::default())
    }
}

impl<T> CheckedMutex<T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Self {
        CheckedMutex {
            inner: sync::Mutex::new(value),
        }
    }

    /// Locks, sleeping if needed (reported inside a non-blockable callback).
    pub fn lock(&self) -> sync::MutexGuard<'_, T> {
        crate::debug::might_sleep();
        sync::lock(&self.inner)
    }

    /// Locks if that needs no waiting.
    pub fn try_lock(&self) -> Option<sync::MutexGuard<'_, T>> {
        match self.inner.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The lock for an invalidation callback over `range`: [`lock`](Self::lock)
    /// if the range is blockable, else [`try_lock`](Self::try_lock) (`None`:
    /// return false, and the invalidation fails with [`Again`](crate::Again)
    /// instead of sleeping).
    pub fn lock_in_callback(&self, range: &Range) -> Option<sync::MutexGuard<'_, T>> {
        if range.blockable() {
            Some(self.lock())
        } else {
            self.try_lock()
        }
    }

    /// Locks without ever sleeping: spins until the lock is free (yielding
    /// the CPU now and then; the thread stays runnable). Allowed in
    /// non-blockable callbacks. Under loom and shuttle it is the model's
    /// blocking lock, which schedules exactly the same waits without a busy
    /// loop for the model checker to explore.
    pub fn spin_lock(&self) -> sync::MutexGuard<'_, T> {
        #[cfg(any(loom, shuttle))]
        {
            sync::lock(&self.inner)
        }
        #[cfg(not(any(loom, shuttle)))]
        {
            let mut spins = 0u32;
            loop {
                if let Some(g) = self.try_lock() {
                    return g;
                }
                spins = spins.wrapping_add(1);
                if spins % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
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
