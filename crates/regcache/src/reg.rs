//! [`Reg`]: one cached registration (internal), what the cache's index,
//! its hit table and the guards share.

use mmu_notifier::sync::{lock, AtomicBool, AtomicU64, Mutex, Ordering};
use mmu_notifier::IntervalNotifier;

use crate::{Access, AddressSpace, Registrar};

/// One device registration of `[start, end)` and what keeps it coherent:
/// its interval notifier and the address space's watch of the range.
///
/// Holders of an `Arc<Reg>`: the cache's index while it is cached, its slot
/// in the lock-free hit table (until a grace period after it left the
/// cache), the cache's dead list between leaving the index and its
/// teardown, and the [`Entry`] guards. Whoever drops the last one
/// deregisters the device handle ([`CacheState::put`], through
/// `Arc::into_inner`, so exactly once).
/// The index and the dead list hold theirs until the registration left the
/// cache and its notifier was removed, so the last holder is always a guard
/// being dropped or the reaper, never a notifier callback.
// `repr(C)`, hot fields first, and cache-line aligned: a lock-free hit
// decides from the hit table's slot alone, and a closure that asks for the
// handle reads it here (for a handle of up to 24 bytes in the same line as
// `start`, `end` and `access`; the `Arc`'s counts sit in the line before,
// touched only when a guard is taken).
#[repr(C, align(64))]
pub(crate) struct Reg<S: AddressSpace, R: Registrar> {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Cache tick of the last locked lookup (written under the cache lock;
    /// lock-free hits stamp the hit table's slot instead).
    pub(crate) last_use: AtomicU64,
    pub(crate) access: Access,
    pub(crate) handle: R::Handle,
    pub(crate) id: u64,
    pub(crate) sub: IntervalNotifier,
    /// Dropped at teardown, after the notifier is removed.
    pub(crate) watch: Mutex<Option<S::Watch>>,
    /// In the cache and coherent with the address space.
    pub(crate) valid: AtomicBool,
    /// Tick under which it sits in the LRU queue (under the cache lock).
    pub(crate) queued: AtomicU64,
    /// The lock-free hit table holds it (written under the cache lock).
    pub(crate) hashed: AtomicBool,
}

impl<S: AddressSpace, R: Registrar> Reg<S, R> {
    pub(crate) fn len(&self) -> u64 {
        self.end - self.start
    }

    pub(crate) fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    pub(crate) fn covers(&self, start: u64, end: u64, access: Access) -> bool {
        self.start <= start && end <= self.end && self.access.contains(access)
    }

    /// Stops the invalidations: removes the interval notifier (waiting for
    /// a callback still running on it) and drops the watch. Never called
    /// from a callback.
    pub(crate) fn teardown(&self) {
        let _ = self.sub.remove();
        drop(lock(&self.watch).take());
    }
}
