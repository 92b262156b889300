//! `RegCache`: the RDMA memory-region cache pattern (UCX `ucs_rcache`,
//! libfabric MR cache). Registrations pin their pages and carry one interval
//! notifier each; an invalidation overlapping a registration takes it out
//! of the cache before the primary changes the PTEs, so a lookup made after
//! a munmap / mremap / madvise / mprotect has returned never returns it.
//!
//! Teardown of invalidated or evicted registrations (removing the interval
//! notifier, unpinning) cannot run inside the callback (`remove` would wait
//! for the invalidation in progress), so it is deferred to the next cache
//! call.
//!
//! ```
//! use mirrors::RegCache;
//! use softmm::{MapKind, Mm, PhysMem, Prot};
//! let phys = PhysMem::new(64);
//! let mm = Mm::new(&phys);
//! let a = mm.mmap(4 * 4096, Prot::RW, MapKind::AnonPrivate).unwrap();
//! let cache = RegCache::new(mm.grab(), 16);
//! let r1 = cache.get(a, 8192, true).unwrap();
//! let r2 = cache.get(a, 4096, false).unwrap(); // hit: covered by r1
//! assert_eq!(r1.id(), r2.id());
//! mm.munmap(a, 4096).unwrap();
//! assert!(!r1.is_valid());
//! assert_ne!(cache.get(a + 4096, 4096, true).unwrap().id(), r1.id());
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, Weak};

use mmu_notifier::sync::{lock, AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering};

use mmu_notifier::{IntervalNotifier, IntervalOps, Range};
use rustc_hash::FxHashMap;

use crate::primary::{FramePrimary, MirrorError, Primary, Result};

/// Retries of one lookup against concurrent invalidations.
const MAX_RETRIES: u32 = 10_000;

/// Registrations a lookup that is not an exact-start hit examines (those
/// starting closest below the address). Past that the lookup counts as a
/// miss and registers: correct, only less sharing.
const SCAN_LIMIT: usize = 16;

const PAGE_MASK: u64 = softmm::PAGE_SIZE - 1;

/// One cached registration (an RDMA memory region).
pub struct Registration<P: Primary> {
    id: u64,
    start: u64,
    len: u64,
    write: bool,
    pinned: OnceLock<P::Pinned>,
    sub: OnceLock<IntervalNotifier>,
    /// Dropped after the notifier is removed (teardown only).
    watch: Mutex<Option<P::Watch>>,
    valid: AtomicBool,
    /// Cache tick of the last hit (written under the cache lock).
    last_use: AtomicU64,
    /// Tick under which it sits in the LRU queue (under the cache lock).
    queued: AtomicU64,
}

impl<P: Primary> std::fmt::Debug for Registration<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &self.len)
            .field("write", &self.write)
            .field("valid", &self.is_valid())
            .finish()
    }
}

impl<P: Primary> Registration<P> {
    /// Unique id (a memory key).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// First address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the registration is empty (never: lengths are nonzero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Registered for writing.
    pub fn writable(&self) -> bool {
        self.write
    }

    /// Still in the cache and coherent with the address space.
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// The pinned memory (set once the registration was returned).
    pub fn pinned(&self) -> Option<&P::Pinned> {
        self.pinned.get()
    }

    fn covers(&self, start: u64, end: u64, write: bool) -> bool {
        self.start <= start && end <= self.start + self.len && (self.write || !write)
    }
}

struct State<P: Primary> {
    /// Valid registrations by (start address, id).
    regs: BTreeMap<(u64, u64), Arc<Registration<P>>>,
    /// The latest valid registration starting at each address: the hit
    /// path for the common lookup of a buffer from its start.
    by_start: FxHashMap<u64, Arc<Registration<P>>>,
    /// LRU queue, lazily ordered: (tick when queued, key). A hit only
    /// stamps `last_use`; eviction re-queues entries used since.
    lru: BTreeMap<u64, (u64, u64)>,
    tick: u64,
    /// Invalidated or evicted, waiting for teardown outside callbacks.
    dead: Vec<Arc<Registration<P>>>,
}

/// Counters of one cache.
#[derive(Debug, Default)]
pub struct RegCacheStats {
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that registered.
    pub misses: AtomicU64,
    /// Registrations dropped by invalidations.
    pub invalidated: AtomicU64,
    /// Registrations evicted by the size limit.
    pub evicted: AtomicU64,
    /// Lookups retried because an invalidation raced the registration.
    pub retries: AtomicU64,
}

struct Shared<P: Primary> {
    primary: P,
    limit: usize,
    state: Mutex<State<P>>,
    /// `state.dead` is not empty (read without the lock on every lookup).
    dead_pending: AtomicBool,
    next_id: AtomicU64,
    stats: RegCacheStats,
}

impl<P: Primary> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        lock(&self.state)
    }
}

fn key<P: Primary>(r: &Registration<P>) -> (u64, u64) {
    (r.start, r.id)
}

impl<P: Primary> State<P> {
    /// Takes `r` out of the cache and queues its teardown. The caller sets
    /// `dead_pending`.
    fn unlink(&mut self, r: &Arc<Registration<P>>) {
        let k = key(r);
        if self.regs.remove(&k).is_some() {
            if self
                .by_start
                .get(&r.start)
                .is_some_and(|b| Arc::ptr_eq(b, r))
            {
                self.by_start.remove(&r.start);
            }
            self.lru.remove(&r.queued.load(Ordering::Relaxed));
            r.valid.store(false, Ordering::Release);
            self.dead.push(r.clone());
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A valid registration covering `[start, end)`.
    fn lookup(&self, start: u64, end: u64, write: bool) -> Option<&Arc<Registration<P>>> {
        if let Some(r) = self.by_start.get(&(start & !PAGE_MASK)) {
            if r.covers(start, end, write) && r.is_valid() {
                return Some(r);
            }
        }
        self.regs
            .range(..=(start, u64::MAX))
            .rev()
            .take(SCAN_LIMIT)
            .map(|(_, r)| r)
            .find(|r| r.covers(start, end, write) && r.is_valid())
    }

    fn insert(&mut self, r: Arc<Registration<P>>) {
        let t = self.next_tick();
        r.last_use.store(t, Ordering::Relaxed);
        r.queued.store(t, Ordering::Relaxed);
        let k = key(&r);
        self.lru.insert(t, k);
        self.by_start.insert(r.start, r.clone());
        self.regs.insert(k, r);
    }

    /// The least recently used registration, if any.
    fn lru_victim(&mut self) -> Option<Arc<Registration<P>>> {
        while let Some((t, k)) = self.lru.pop_first() {
            let Some(r) = self.regs.get(&k).cloned() else {
                continue;
            };
            let used = r.last_use.load(Ordering::Relaxed);
            if used != t {
                r.queued.store(used, Ordering::Relaxed);
                self.lru.insert(used, k);
                continue;
            }
            return Some(r);
        }
        None
    }
}

struct Ops<P: Primary> {
    cache: Weak<Shared<P>>,
    reg: Weak<Registration<P>>,
}

impl<P: Primary> IntervalOps for Ops<P> {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
        let (Some(cache), Some(reg)) = (self.cache.upgrade(), self.reg.upgrade()) else {
            sub.set_seq(seq);
            return true;
        };
        let Some(mut st) = crate::lock::lock_for(&cache.state, r) else {
            return false;
        };
        sub.set_seq(seq);
        if reg.is_valid() {
            cache.stats.invalidated.fetch_add(1, Ordering::Relaxed);
        }
        reg.valid.store(false, Ordering::Release);
        st.unlink(&reg);
        cache.dead_pending.store(true, Ordering::Release);
        true
    }
}

/// A registration cache over one address space, holding at most `limit`
/// registrations (least recently used evicted first).
pub struct RegCache<P: Primary> {
    shared: Arc<Shared<P>>,
}

impl<P: Primary> std::fmt::Debug for RegCache<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegCache")
            .field("limit", &self.shared.limit)
            .field("stats", &self.shared.stats)
            .finish()
    }
}

impl<P: Primary> RegCache<P> {
    /// An empty cache.
    pub fn new(primary: P, limit: usize) -> Self {
        RegCache {
            shared: Arc::new(Shared {
                primary,
                limit: limit.max(1),
                state: Mutex::new(State {
                    regs: BTreeMap::new(),
                    by_start: FxHashMap::default(),
                    lru: BTreeMap::new(),
                    tick: 0,
                    dead: Vec::new(),
                }),
                dead_pending: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                stats: RegCacheStats::default(),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &RegCacheStats {
        &self.shared.stats
    }

    /// Registrations cached now.
    pub fn len(&self) -> usize {
        self.shared.lock().regs.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns a valid registration covering `[start, start + len)` (for
    /// writing if `write`), registering one if none is cached.
    ///
    /// The returned registration was valid after every change to the
    /// address space that returned before this call started (the primary's
    /// [`flush`](Primary::flush) runs first); it stays pinned while the
    /// handle lives, and [`Registration::is_valid`] turns false once a
    /// later change invalidates it.
    ///
    /// # Errors
    /// The primary's watch and pin errors; [`MirrorError::Notifier`];
    /// [`MirrorError::Busy`].
    pub fn get(&self, start: u64, len: u64, write: bool) -> Result<Arc<Registration<P>>> {
        let end = start
            .checked_add(len)
            .filter(|&e| len > 0 && e <= softmm::TASK_SIZE)
            .ok_or(softmm::Error::InvalidRange { addr: start, len })?;
        self.shared.primary.flush()?;
        if self.shared.dead_pending.load(Ordering::Acquire) {
            self.reap();
        }
        {
            let mut st = self.shared.lock();
            if let Some(r) = st.lookup(start, end, write).cloned() {
                let t = st.next_tick();
                r.last_use.store(t, Ordering::Relaxed);
                // Every hit is counted under the cache lock: a plain
                // increment, not a read-modify-write on the hit path.
                let hits = &self.shared.stats.hits;
                hits.store(hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                return Ok(r);
            }
        }
        self.shared.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (pstart, pend) = (start & !PAGE_MASK, (end + PAGE_MASK) & !PAGE_MASK);
        for _ in 0..MAX_RETRIES {
            let reg = Arc::new(Registration {
                id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
                start: pstart,
                len: pend - pstart,
                write,
                pinned: OnceLock::new(),
                sub: OnceLock::new(),
                watch: Mutex::new(None),
                valid: AtomicBool::new(false),
                last_use: AtomicU64::new(0),
                queued: AtomicU64::new(0),
            });
            if let Some(r) = self.register(&reg)? {
                return Ok(r);
            }
        }
        Err(MirrorError::Busy)
    }

    /// One registration attempt: `Ok(None)` when an invalidation raced it.
    fn register(&self, reg: &Arc<Registration<P>>) -> Result<Option<Arc<Registration<P>>>> {
        let p = &self.shared.primary;
        let (start, len) = (reg.start, reg.len);
        let watch = p.watch(start, len)?;
        *lock(&reg.watch) = Some(watch);
        let ops = Ops {
            cache: Arc::downgrade(&self.shared),
            reg: Arc::downgrade(reg),
        };
        let sub = match p.subscriptions().interval_insert(start, len, Arc::new(ops)) {
            Ok(sub) => reg.sub.get_or_init(|| sub),
            Err(e) => {
                self.teardown(reg);
                return Err(e.into());
            }
        };
        // The interval protocol: sample, pin (may fault and sleep), then
        // under the cache lock check that no invalidation hit the range. The
        // flush makes invalidations of changes that returned during the pin
        // count.
        let pinned = sub
            .read_begin()
            .map_err(MirrorError::from)
            .and_then(|seq| Ok((seq, p.pin(start, len, reg.write)?)))
            .and_then(|(seq, pinned)| p.flush().map(|()| (seq, pinned)));
        let seq = match pinned {
            Ok((seq, pinned)) => {
                let _ = reg.pinned.set(pinned);
                seq
            }
            Err(e) => {
                self.teardown(reg);
                return Err(e);
            }
        };
        let mut st = self.shared.lock();
        if sub.read_retry(seq) {
            drop(st);
            self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
            self.teardown(reg);
            return Ok(None);
        }
        reg.valid.store(true, Ordering::Release);
        st.insert(reg.clone());
        let mut evicted = false;
        while st.regs.len() > self.shared.limit {
            let Some(victim) = st.lru_victim() else {
                break;
            };
            self.shared.stats.evicted.fetch_add(1, Ordering::Relaxed);
            st.unlink(&victim);
            evicted = true;
        }
        if evicted {
            self.shared.dead_pending.store(true, Ordering::Release);
        }
        Ok(Some(reg.clone()))
    }

    fn teardown(&self, reg: &Registration<P>) {
        if let Some(sub) = reg.sub.get() {
            let _ = sub.remove();
        }
        drop(lock(&reg.watch).take());
    }

    /// Tears down registrations invalidated or evicted since the last call
    /// (interval notifier removed, pages unpinned once the last user drops
    /// its handle).
    pub fn reap(&self) {
        let dead = {
            let mut st = self.shared.lock();
            self.shared.dead_pending.store(false, Ordering::Relaxed);
            std::mem::take(&mut st.dead)
        };
        for r in dead {
            self.teardown(&r);
        }
    }
}

impl<P: FramePrimary> RegCache<P> {
    /// An access through a registration (a NIC DMA), checked by the oracle:
    /// the pin must hold, and while the registration is valid its pinned
    /// frame must be exactly what the primary maps at `addr` (the
    /// "never stale" promise, checked under the cache lock that
    /// invalidations take before the primary changes anything).
    ///
    /// # Errors
    /// [`MirrorError::Violation`]; [`MirrorError::Released`] for an
    /// invalidated registration (the caller must look up again);
    /// [`MirrorError::OutOfRange`] for an address the registration does not
    /// cover.
    pub fn check(&self, reg: &Registration<P>, addr: u64, write: bool) -> Result<()> {
        let end = reg.start + reg.len;
        if !(reg.start..end).contains(&addr) {
            return Err(MirrorError::OutOfRange {
                addr,
                start: reg.start,
                end,
            });
        }
        let _st = self.shared.lock();
        let p = &self.shared.primary;
        let pinned = reg.pinned.get().ok_or(MirrorError::Released)?;
        p.check_pinned(pinned, addr, write)?;
        if !reg.is_valid() {
            return Err(MirrorError::Released);
        }
        let frame = p.pinned_frame(pinned, addr).ok_or(MirrorError::Released)?;
        p.check_access(addr, frame, write)
    }
}

impl<P: Primary> Drop for RegCache<P> {
    fn drop(&mut self) {
        let regs: Vec<_> = {
            let mut st = self.shared.lock();
            let regs: Vec<_> = st.regs.values().cloned().collect();
            for r in &regs {
                st.unlink(r);
            }
            regs
        };
        drop(regs);
        self.reap();
    }
}
