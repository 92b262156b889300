//! [`DriverLock`]: the user lock of the interval-notifier protocol, as a
//! type.

use crate::interval::IntervalNotifier;
use crate::mutex::CheckedMutex;
use crate::range::Range;
use crate::sync::MutexGuard;

/// The lock an interval-notifier user ("driver") holds around both halves
/// of the collision-retry protocol, with the protocol in its methods, so a
/// mirror cannot take one half without the other:
///
/// * [`invalidate`](Self::invalidate), from [`IntervalOps::invalidate`]:
///   takes the lock (in a non-blockable range only tries, and reports
///   failure so the callback returns false), records the new sequence with
///   [`IntervalNotifier::set_seq`], and runs the closure that drops the
///   mappings of the range;
/// * [`commit`](Self::commit), from the fault path after
///   [`IntervalNotifier::read_begin`] and the page walk: takes the lock and
///   runs the closure that installs the mappings only if
///   [`IntervalNotifier::read_retry`] says no invalidation collided.
///
/// Linux drivers write this by hand around their own mutex (the
/// `mmu_interval_read_begin` / `mmu_interval_read_retry` pattern of
/// `lib/test_hmm.c` and the GPU drivers).
///
/// [`IntervalOps::invalidate`]: crate::IntervalOps::invalidate
///
/// ```
/// use std::collections::BTreeMap;
/// use std::sync::Arc;
/// use mmu_notifier::{DriverLock, Event, IntervalNotifier, IntervalOps, Range, Subscriptions};
///
/// /// A device page table: address -> frame.
/// struct Mirror(DriverLock<BTreeMap<u64, u64>>);
///
/// impl IntervalOps for Mirror {
///     fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
///         self.0
///             .invalidate(sub, r, seq, |pt| pt.retain(|&a, _| !(r.start() <= a && a < r.end())))
///             .is_some()
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let mirror = Arc::new(Mirror(DriverLock::new(BTreeMap::new())));
/// let sub = mm.interval_insert(0x10000, 0x1000, mirror.clone()).unwrap();
/// // The fault path: sample, walk the primary's page table, commit.
/// let seq = sub.read_begin().unwrap();
/// let frame = 42; // from the walk
/// assert!(mirror.0.commit(&sub, seq, |pt| pt.insert(0x10000, frame)).is_some());
/// // An invalidation drops it; a commit with the old sequence is refused.
/// mm.invalidate_range_start(Range::new(0x10000, 0x11000, Event::Unmap).unwrap()).end();
/// assert!(mirror.0.lock().is_empty());
/// assert!(mirror.0.commit(&sub, seq, |pt| pt.insert(0x10000, frame)).is_none());
/// sub.remove().unwrap();
/// ```
pub struct DriverLock<T> {
    data: CheckedMutex<T>,
}

impl<T> std::fmt::Debug for DriverLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverLock").finish_non_exhaustive()
    }
}

impl<T> DriverLock<T> {
    /// The lock around the mirror's state `data`.
    pub fn new(data: T) -> Self {
        DriverLock {
            data: CheckedMutex::new(data),
        }
    }

    /// The invalidation half: for [`IntervalOps::invalidate`](crate::IntervalOps::invalidate)
    /// of `sub` over `range` with `cur_seq`. Takes the lock (only tries when
    /// the range is not blockable), calls `sub.set_seq(cur_seq)`, then
    /// `drop_mappings`. `None` when the range is not blockable and the lock
    /// is taken: return false from the callback (the invalidation fails with
    /// [`Again`](crate::Again) instead of sleeping).
    pub fn invalidate<R>(
        &self,
        sub: &IntervalNotifier,
        range: &Range,
        cur_seq: u64,
        drop_mappings: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut g = self.data.lock_in_callback(range)?;
        sub.set_seq(cur_seq);
        Some(drop_mappings(&mut g))
    }

    /// The commit half: takes the lock and, unless an invalidation of `sub`
    /// collided since `seq` was returned by
    /// [`read_begin`](IntervalNotifier::read_begin), runs `install`. `None`
    /// on a collision: take a new sequence and redo the walk.
    pub fn commit<R>(
        &self,
        sub: &IntervalNotifier,
        seq: u64,
        install: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut g = self.lock();
        if sub.read_retry(seq) {
            return None;
        }
        Some(install(&mut g))
    }

    /// The lock itself, for everything outside the protocol (reads of the
    /// mirror's state, teardown). It may sleep: inside a non-blockable
    /// callback that is reported, as by [`CheckedMutex::lock`].
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.data.lock()
    }
}
