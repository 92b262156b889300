//! [`CacheState`] (internal): what the cache, its guards and its interval
//! notifiers share: the lock and index, the hit table, the counters, the
//! invalidation callback (`RegOps`) and the teardown of what left the cache.

use std::sync::{Arc, Weak};

use mmu_notifier::sync::{AtomicBool, AtomicU64, MutexGuard, Ordering};
use mmu_notifier::{DriverLock, IntervalNotifier, IntervalOps, Range};

use crate::config::{CacheStats, Config};
use crate::hits::HitTable;
use crate::index::{Index, Key};
use crate::reg::Reg;
use crate::{AddressSpace, CacheError, Limits, Registrar};

pub(crate) struct CacheState<S: AddressSpace, R: Registrar> {
    pub(crate) space: S,
    pub(crate) registrar: R,
    pub(crate) limits: Limits,
    pub(crate) config: Config,
    /// The index, under the user lock of the interval protocol: callbacks
    /// take it to unlink, the registration path to commit.
    pub(crate) index: DriverLock<Index<S, R>>,
    /// The lock-free read side: cached registrations by start page,
    /// written next to the index under its lock.
    pub(crate) hits: HitTable<S, R>,
    /// The index's latest tick; a lock-free hit stamps the one after it as
    /// its use (so LRU order among hits between two changes of the index
    /// is by key, not by time).
    pub(crate) clock: AtomicU64,
    /// `index.dead` is not empty (read without the lock on every lookup).
    pub(crate) dead_pending: AtomicBool,
    /// Bytes of registrations unlinked and not yet deregistered.
    pub(crate) unreleased_bytes: AtomicU64,
    pub(crate) next_id: AtomicU64,
    pub(crate) stats: CacheStats,
}

impl<S: AddressSpace, R: Registrar> CacheState<S, R> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Index<S, R>> {
        self.index.lock()
    }

    /// Unlinks `r` (under the lock `ix`) and accounts for it.
    pub(crate) fn unlink(&self, ix: &mut Index<S, R>, r: &Arc<Reg<S, R>>) -> bool {
        let Some(len) = ix.unlink(r) else {
            return false;
        };
        self.hits.remove(ix, r);
        self.unreleased_bytes.fetch_add(len, Ordering::Relaxed);
        self.dead_pending.store(true, Ordering::Release);
        true
    }

    /// Drops one holder of `reg`; the last one deregisters it.
    pub(crate) fn put(&self, reg: Arc<Reg<S, R>>) {
        if let Some(reg) = Arc::into_inner(reg) {
            // Only registrations that left the cache lose their last holder.
            let len = reg.len();
            self.unreleased_bytes.fetch_sub(len, Ordering::Relaxed);
            self.release_handle(reg.handle, len);
        }
    }

    /// Deregisters a handle (no lock held) and uncounts it.
    pub(crate) fn release_handle(&self, handle: R::Handle, len: u64) {
        self.stats.deregistrations.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.registrar.deregister(handle) {
            self.stats
                .deregister_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "regcache: deregistration failed");
        }
        self.lock().unreserve(len);
    }

    /// Tears down what left the cache: notifiers removed, watches dropped,
    /// handles deregistered unless a guard still holds them.
    pub(crate) fn reap(&self) {
        let dead = {
            let mut ix = self.lock();
            self.dead_pending.store(false, Ordering::Relaxed);
            std::mem::take(&mut ix.dead)
        };
        if dead.is_empty() {
            return;
        }
        // The hit table's slots of these registrations are freed after a
        // grace period (a lock-free hit may still be using one): wait for
        // those frees, so the last holder below is the dead list or a guard.
        // Inside a read-side section (a `with_hit` closure on this thread)
        // that wait could never end: leave them for the next reap.
        if self.hits.domain().barrier().is_err() {
            let mut ix = self.lock();
            ix.dead.extend(dead);
            self.dead_pending.store(true, Ordering::Release);
            return;
        }
        for r in dead {
            r.teardown();
            self.put(r);
        }
    }

    /// Takes out the registrations nobody holds, least recently used first
    /// (all of them, or just enough to make room for one more handle of
    /// `room_for` bytes), and reaps them; returns how many.
    pub(crate) fn evict_unused(&self, room_for: Option<u64>) -> usize {
        let n = {
            let mut ix = self.lock();
            let victims = ix.unused_victims(room_for.map(|len| (&self.limits, len)));
            for r in &victims {
                self.unlink(&mut ix, r);
            }
            victims.len()
        };
        self.stats.evicted.fetch_add(n as u64, Ordering::Relaxed);
        self.reap();
        n
    }

    /// Counts one more handle of `len` bytes against the device's limits,
    /// making room first if needed.
    pub(crate) fn reserve(&self, len: u64) -> Result<(), CacheError> {
        if self.lock().try_reserve(&self.limits, len) {
            return Ok(());
        }
        self.reap();
        self.evict_unused(Some(len));
        let mut ix = self.lock();
        if ix.try_reserve(&self.limits, len) {
            return Ok(());
        }
        let msg = format!(
            "{} handles ({} bytes) are held by guards; the device allows {} handles, {} bytes",
            ix.live_handles, ix.live_bytes, self.limits.max_handles, self.limits.max_bytes
        );
        drop(ix);
        self.stats.exhausted.fetch_add(1, Ordering::Relaxed);
        Err(CacheError::Exhausted { source: msg.into() })
    }

    /// Takes every cached registration out and tears down all that left
    /// the cache (the cache's drop).
    pub(crate) fn clear(&self) {
        let regs = {
            let mut ix = self.lock();
            let regs = ix.all();
            for r in &regs {
                self.unlink(&mut ix, r);
            }
            regs
        };
        drop(regs);
        self.reap();
    }
}

impl<S: AddressSpace, R: Registrar> Drop for CacheState<S, R> {
    fn drop(&mut self) {
        // The cache's own drop emptied the index; whatever is still here
        // (nothing, unless a drop was skipped) is deregistered, not leaked.
        self.clear();
    }
}

/// The interval notifier of one registration: an invalidation of its range
/// takes it out of the cache.
pub(crate) struct RegOps<S: AddressSpace, R: Registrar> {
    pub(crate) cache: Weak<CacheState<S, R>>,
    pub(crate) key: Key,
}

impl<S: AddressSpace, R: Registrar> IntervalOps for RegOps<S, R> {
    fn invalidate(&self, sub: &IntervalNotifier, range: &Range, seq: u64) -> bool {
        let Some(cache) = self.cache.upgrade() else {
            sub.set_seq(seq);
            return true;
        };
        cache
            .index
            .invalidate(sub, range, seq, |ix| {
                if let Some(reg) = ix.get(&self.key).cloned() {
                    cache.stats.invalidated.fetch_add(1, Ordering::Relaxed);
                    cache.unlink(ix, &reg);
                }
            })
            .is_some()
    }
}
