//! [`Index`]: the cached registrations, by address and by age, and the
//! device usage counts. Everything here is under the cache lock; the
//! lock-free read side is the `hits` module's table, which the cache
//! updates next to this one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mmu_notifier::sync::Ordering;

use crate::reg::Reg;
use crate::{Access, AddressSpace, Limits, Registrar};

/// Registrations a lookup that is not an exact-start hit examines (those
/// starting closest below the address). Past that the lookup counts as a
/// miss and registers: correct, only less sharing.
const SCAN_LIMIT: usize = 16;

/// Key of a cached registration: (start address, id).
pub(crate) type Key = (u64, u64);

pub(crate) struct Index<S: AddressSpace, R: Registrar> {
    /// Valid registrations by (start address, id).
    regs: BTreeMap<Key, Arc<Reg<S, R>>>,
    /// LRU queue, lazily ordered by (tick when queued, key). A hit only
    /// stamps its tick (lock-free hits, in the hit table's slot, the tick they read, so two
    /// registrations can share one: the key keeps entries apart); eviction
    /// re-queues entries used since.
    lru: BTreeSet<(u64, Key)>,
    tick: u64,
    /// Left the cache, waiting for teardown outside callbacks.
    pub(crate) dead: Vec<Arc<Reg<S, R>>>,
    /// Live device handles (cached, dead, or held only by guards) and
    /// their bytes, counted against the device's [`Limits`].
    pub(crate) live_handles: usize,
    pub(crate) live_bytes: u64,
}

impl<S: AddressSpace, R: Registrar> Index<S, R> {
    pub(crate) fn new() -> Self {
        Index {
            regs: BTreeMap::new(),
            lru: BTreeSet::new(),
            tick: 0,
            dead: Vec::new(),
            live_handles: 0,
            live_bytes: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.regs.len()
    }

    /// The latest tick.
    pub(crate) fn tick(&self) -> u64 {
        self.tick
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A valid registration covering `[start, end)` for `access`, stamped
    /// as used: the locked lookup, for what the lock-free table did not
    /// answer (a lookup from inside a registration, an overfull window).
    pub(crate) fn lookup(
        &mut self,
        start: u64,
        end: u64,
        access: Access,
    ) -> Option<&Arc<Reg<S, R>>> {
        let key = self
            .regs
            .range(..=(start, u64::MAX))
            .rev()
            .take(SCAN_LIMIT)
            .find(|(_, r)| r.covers(start, end, access) && r.is_valid())
            .map(|(k, _)| *k)?;
        let t = self.next_tick();
        let r = self.regs.get(&key)?;
        r.last_use.store(t, Ordering::Relaxed);
        Some(r)
    }

    /// The registration cached under `key`, if still cached.
    pub(crate) fn get(&self, key: &Key) -> Option<&Arc<Reg<S, R>>> {
        self.regs.get(key)
    }

    pub(crate) fn insert(&mut self, r: Arc<Reg<S, R>>) {
        let t = self.next_tick();
        r.last_use.store(t, Ordering::Relaxed);
        r.queued.store(t, Ordering::Relaxed);
        r.valid.store(true, Ordering::Release);
        let k = (r.start, r.id);
        self.lru.insert((t, k));
        self.regs.insert(k, r);
    }

    /// Takes `r` out of the cache (invalid from now on) and queues its
    /// teardown. Returns its length if it was cached.
    pub(crate) fn unlink(&mut self, r: &Arc<Reg<S, R>>) -> Option<u64> {
        let k = (r.start, r.id);
        self.regs.remove(&k)?;
        self.lru.remove(&(r.queued.load(Ordering::Relaxed), k));
        r.valid.store(false, Ordering::Release);
        self.dead.push(r.clone());
        Some(r.len())
    }

    /// Whether nothing but the index and the hit table hold `r` (no guard
    /// exists, and none can be made without the cache lock or a hit). A
    /// slot retired by the hit table still counts until its grace period
    /// ends: `r` is then taken as used, which only delays its eviction.
    fn unused(&self, r: &Arc<Reg<S, R>>) -> bool {
        let indexed = 1 + usize::from(r.hashed.load(Ordering::Relaxed));
        Arc::strong_count(r) == indexed
    }

    /// The least recently used registration, if any; `last_use` is a
    /// registration's latest tick (the hit table keeps the lock-free hits'
    /// tick apart from `Reg::last_use`).
    pub(crate) fn lru_victim(
        &mut self,
        last_use: impl Fn(&Arc<Reg<S, R>>) -> u64,
    ) -> Option<Arc<Reg<S, R>>> {
        while let Some((t, k)) = self.lru.pop_first() {
            let Some(r) = self.regs.get(&k).cloned() else {
                continue;
            };
            let used = last_use(&r);
            if used != t {
                r.queued.store(used, Ordering::Relaxed);
                self.lru.insert((used, k));
                continue;
            }
            return Some(r);
        }
        None
    }

    /// Registrations nobody holds, least recently queued first: all of
    /// them, or with `room_for`, just enough for one more handle of that
    /// many bytes to fit the limits once they are gone.
    pub(crate) fn unused_victims(&self, room_for: Option<(&Limits, u64)>) -> Vec<Arc<Reg<S, R>>> {
        let (mut n, mut bytes) = (0, 0);
        let mut out = Vec::new();
        for (_, k) in self.lru.iter() {
            if room_for.is_some_and(|(limits, len)| self.fits_after(limits, len, n, bytes)) {
                break;
            }
            let Some(r) = self.regs.get(k) else { continue };
            if self.unused(r) {
                n += 1;
                bytes += r.len();
                out.push(r.clone());
            }
        }
        out
    }

    /// Whether one more handle of `len` bytes fits the limits once `freed`
    /// live handles of `freed_bytes` are gone.
    fn fits_after(&self, limits: &Limits, len: u64, freed: usize, freed_bytes: u64) -> bool {
        self.live_handles - freed < limits.max_handles
            && limits
                .max_bytes
                .saturating_sub(self.live_bytes - freed_bytes)
                >= len
    }

    /// Counts one more live handle of `len` bytes if it fits the limits.
    pub(crate) fn try_reserve(&mut self, limits: &Limits, len: u64) -> bool {
        let fits = self.fits_after(limits, len, 0, 0);
        if fits {
            self.live_handles += 1;
            self.live_bytes += len;
        }
        fits
    }

    /// Uncounts a live handle of `len` bytes (deregistered, or never made).
    pub(crate) fn unreserve(&mut self, len: u64) {
        self.live_handles -= 1;
        self.live_bytes -= len;
    }

    /// Every cached registration (for the cache's drop).
    pub(crate) fn all(&self) -> Vec<Arc<Reg<S, R>>> {
        self.regs.values().cloned().collect()
    }
}
