//! [`RegCache`]: lookups, the registration protocol, eviction and reaping.

use std::fmt;
use std::sync::{Arc, Weak};

use mmu_notifier::sync::{AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering};
use mmu_notifier::{DriverLock, IntervalNotifier, IntervalOps, Range, PAGE_SIZE};

use crate::entry::{Entry, Hit, Reg};
use crate::hits::HitTable;
use crate::index::{Index, Key};
use crate::registrar::BoxError;
use crate::{Access, AddressSpace, CacheError, Limits, RegError, Registrar};

/// Tuning of a [`RegCache`]; [`Config::default`] is a safe start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Cached registrations at most; past it the least recently used one
    /// leaves the cache (it stays registered while a guard holds it).
    pub max_cached: usize,
    /// Bytes of registrations that left the cache but are still registered
    /// (waiting for teardown or held by guards). Teardown of what left the
    /// cache runs at every miss; past this bound it also runs on hits, so
    /// invalidated memory does not stay registered (and pinned) for long
    /// in a cache that only hits.
    pub max_unreleased_bytes: u64,
    /// Registrations of one lookup thrown away because an invalidation of
    /// the range raced them, before the lookup gives up with
    /// [`CacheError::Busy`]. The address-space watch and the interval
    /// notifier are kept across these attempts.
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_cached: 1024,
            max_unreleased_bytes: 16 << 20,
            max_attempts: 16,
        }
    }
}

/// Counters of one cache (all relaxed; read them for reports).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that found nothing cached.
    pub misses: AtomicU64,
    /// Successful `Registrar::register` calls.
    pub registrations: AtomicU64,
    /// `Registrar::deregister` calls.
    pub deregistrations: AtomicU64,
    /// `Registrar::deregister` calls that reported an error.
    pub deregister_failures: AtomicU64,
    /// Registrations taken out of the cache by invalidations.
    pub invalidated: AtomicU64,
    /// Registrations evicted (LRU limit, or to make room on the device).
    pub evicted: AtomicU64,
    /// Registrations thrown away because an invalidation raced them.
    pub retries: AtomicU64,
    /// Lookups that failed with [`CacheError::Exhausted`].
    pub exhausted: AtomicU64,
    /// Lookups that failed with [`CacheError::Busy`].
    pub busy: AtomicU64,
}

/// What the cache holds on the device now (see [`RegCache::usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Registrations in the cache.
    pub cached: usize,
    /// Live device handles: cached, left the cache but not yet torn down,
    /// or held only by guards.
    pub live_handles: usize,
    /// Their bytes.
    pub live_bytes: u64,
    /// Bytes of live handles that left the cache.
    pub unreleased_bytes: u64,
}

pub(crate) struct CacheState<S: AddressSpace, R: Registrar> {
    space: S,
    registrar: R,
    limits: Limits,
    config: Config,
    /// The index, under the user lock of the interval protocol: callbacks
    /// take it to unlink, the registration path to commit.
    index: DriverLock<Index<S, R>>,
    /// The lock-free read side: cached registrations by start page,
    /// written next to the index under its lock.
    pub(crate) hits: HitTable<S, R>,
    /// The index's latest tick; a lock-free hit stamps the one after it as
    /// its use (so LRU order among hits between two changes of the index
    /// is by key, not by time).
    pub(crate) clock: AtomicU64,
    /// `index.dead` is not empty (read without the lock on every lookup).
    dead_pending: AtomicBool,
    /// Bytes of registrations unlinked and not yet deregistered.
    unreleased_bytes: AtomicU64,
    next_id: AtomicU64,
    stats: CacheStats,
}

impl<S: AddressSpace, R: Registrar> CacheState<S, R> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Index<S, R>> {
        self.index.lock()
    }

    /// Unlinks `r` (under the lock `ix`) and accounts for it.
    fn unlink(&self, ix: &mut Index<S, R>, r: &Arc<Reg<S, R>>) -> bool {
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
    fn release_handle(&self, handle: R::Handle, len: u64) {
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
    fn reap(&self) {
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
    fn evict_unused(&self, room_for: Option<u64>) -> usize {
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
    fn reserve(&self, len: u64) -> Result<(), CacheError> {
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
    fn clear(&self) {
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
struct RegOps<S: AddressSpace, R: Registrar> {
    cache: Weak<CacheState<S, R>>,
    key: Key,
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

/// A registration cache: device registrations of an address space's memory
/// (RDMA memory regions, io_uring fixed buffers, DMA maps), looked up by
/// address and kept exact with one interval notifier each.
///
/// See the crate docs for the lifecycle and the guarantees.
pub struct RegCache<S: AddressSpace, R: Registrar> {
    shared: Arc<CacheState<S, R>>,
}

impl<S: AddressSpace, R: Registrar> fmt::Debug for RegCache<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegCache")
            .field("config", &self.shared.config)
            .field("limits", &self.shared.limits)
            .field("usage", &self.usage())
            .field("stats", &self.shared.stats)
            .finish()
    }
}

/// The end of a valid request, or why it is not one.
fn check_request(start: u64, len: u64, access: Access) -> Result<u64, CacheError> {
    let bad = |why| CacheError::InvalidRequest { start, len, why };
    if len == 0 {
        return Err(bad("empty range"));
    }
    if access.is_empty() {
        return Err(bad("no access flag"));
    }
    start.checked_add(len).ok_or(bad("range wraps around"))
}

fn page_round(start: u64, end: u64) -> Option<(u64, u64)> {
    Some((
        start & !(PAGE_SIZE - 1),
        end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1),
    ))
}

impl<S: AddressSpace, R: Registrar> RegCache<S, R> {
    /// An empty cache over `space`, registering with `registrar`, with
    /// [`Config::default`].
    pub fn new(space: S, registrar: R) -> Self {
        Self::with_config(space, registrar, Config::default())
    }

    /// An empty cache with the given tuning (a `max_cached` or
    /// `max_attempts` of 0 is taken as 1).
    pub fn with_config(space: S, registrar: R, config: Config) -> Self {
        let limits = registrar.limits();
        let config = Config {
            max_cached: config.max_cached.max(1),
            max_attempts: config.max_attempts.max(1),
            ..config
        };
        let domain = space.subscriptions().domain();
        RegCache {
            shared: Arc::new(CacheState {
                space,
                registrar,
                limits,
                config,
                hits: HitTable::new(config.max_cached, domain),
                clock: AtomicU64::new(0),
                index: DriverLock::new(Index::new()),
                dead_pending: AtomicBool::new(false),
                unreleased_bytes: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                stats: CacheStats::default(),
            }),
        }
    }

    /// The address space.
    pub fn space(&self) -> &S {
        &self.shared.space
    }

    /// The device.
    pub fn registrar(&self) -> &R {
        &self.shared.registrar
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.shared.stats
    }

    /// Registrations cached and device handles live now.
    pub fn usage(&self) -> Usage {
        let ix = self.shared.lock();
        Usage {
            cached: ix.len(),
            live_handles: ix.live_handles,
            live_bytes: ix.live_bytes,
            unreleased_bytes: self.shared.unreleased_bytes.load(Ordering::Relaxed),
        }
    }

    /// Registrations cached now.
    pub fn len(&self) -> usize {
        self.shared.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A valid registration covering `[start, start + len)` with at least
    /// `access`, registering one if none is cached.
    ///
    /// The registration returned was coherent with the address space after
    /// every change that took effect before this call (the address space's
    /// [`flush`](AddressSpace::flush) runs first); it stays registered while
    /// the returned guard (or a clone) lives, and
    /// [`Entry::is_valid`] turns false once a later change takes it out.
    ///
    /// # Errors
    /// [`CacheError`]; [`CacheError::fall_back`] tells whether to do the I/O
    /// without a registration instead.
    pub fn get(&self, start: u64, len: u64, access: Access) -> Result<Entry<S, R>, CacheError> {
        let end = check_request(start, len, access)?;
        let bad = |why| CacheError::InvalidRequest { start, len, why };
        let sh = &self.shared;
        sh.space
            .flush()
            .map_err(|e| CacheError::AddressSpace(Box::new(e)))?;
        if sh.dead_pending.load(Ordering::Acquire)
            && sh.unreleased_bytes.load(Ordering::Relaxed) > sh.config.max_unreleased_bytes
        {
            sh.reap();
        }
        if let Some(e) = self.hit(start, end, access, |h| h.entry()) {
            sh.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(e);
        }
        {
            let mut ix = sh.lock();
            if let Some(r) = ix.lookup(start, end, access).cloned() {
                sh.clock.store(ix.tick(), Ordering::Relaxed);
                drop(ix);
                sh.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Entry {
                    shared: sh.clone(),
                    reg: Some(r),
                });
            }
        }
        sh.stats.misses.fetch_add(1, Ordering::Relaxed);
        sh.reap();
        let (ps, pe) = page_round(start, end).ok_or(bad("range wraps around"))?;
        self.register(ps, pe, access)
    }

    /// Runs `f` on a cached registration covering `[start, start + len)`
    /// with at least `access` that starts in the same page as `start`, if
    /// there is one: the lock-free hit. Returns `Ok(None)` without calling
    /// `f` otherwise (then [`get`](Self::get) finds or makes one).
    ///
    /// The hit takes no lock and writes no shared word (no reference count,
    /// no statistics): the address space's flush (one load with the eBPF
    /// feed), a read-side section of its SRCU domain (a thread-local
    /// counter), and a probe of the hit table. The registration stays
    /// registered while `f` runs; to keep it longer (until an I/O
    /// completes, say) take an [`Entry`] with [`Hit::entry`].
    ///
    /// It gives [`get`](Self::get)'s guarantee: the registration was
    /// coherent after every change that took effect before this call.
    /// Hits here are not counted in [`CacheStats::hits`], and inside `f`
    /// the thread is in a read-side section: a `get` there that misses
    /// still works, but waits for nothing (teardown is left for later).
    ///
    /// # Errors
    /// As [`get`](Self::get) for an invalid request or a failed flush.
    #[inline]
    pub fn with_hit<T>(
        &self,
        start: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(&Hit<'_, S, R>) -> T,
    ) -> Result<Option<T>, CacheError> {
        let end = check_request(start, len, access)?;
        self.shared
            .space
            .flush()
            .map_err(|e| CacheError::AddressSpace(Box::new(e)))?;
        Ok(self.hit(start, end, access, f))
    }

    /// The lock-free probe behind [`with_hit`](Self::with_hit) and `get`.
    #[inline]
    fn hit<T>(
        &self,
        start: u64,
        end: u64,
        access: Access,
        f: impl FnOnce(&Hit<'_, S, R>) -> T,
    ) -> Option<T> {
        let sh = &self.shared;
        let section = sh.hits.read_lock();
        let slot = sh.hits.find(&section, start, end, access)?;
        // Stamp the use for the LRU order in the slot: later than every
        // tick queued so far (the clock is the latest), writing only when it
        // changed.
        slot.stamp_with(sh.clock.load(Ordering::Relaxed) + 1);
        Some(f(&Hit {
            shared: &self.shared,
            slot: &slot,
        }))
    }

    /// The miss path: watch, insert the interval notifier, then register
    /// under the interval protocol (`read_begin`, register, flush, and under
    /// the cache lock `read_retry`), at most `max_attempts` times.
    fn register(&self, ps: u64, pe: u64, access: Access) -> Result<Entry<S, R>, CacheError> {
        let sh = &self.shared;
        let (start, end) = sh.registrar.align(ps, pe);
        if !(start <= ps && pe <= end && start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0) {
            return Err(CacheError::Device(
                format!("Registrar::align({ps:#x}, {pe:#x}) returned {start:#x}..{end:#x}, which is not page-aligned around the request").into(),
            ));
        }
        let len = end - start;
        if len > sh.limits.max_len {
            return Err(CacheError::Unsupported {
                start,
                len,
                source: format!(
                    "longer than the device's {} bytes per registration",
                    sh.limits.max_len
                )
                .into(),
            });
        }
        let watch = sh
            .space
            .watch(start, len)
            .map_err(|e| CacheError::Unwatchable {
                start,
                len,
                source: Box::new(e),
            })?;
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let ops = RegOps {
            cache: Arc::downgrade(sh),
            key: (start, id),
        };
        let sub = sh
            .space
            .subscriptions()
            .interval_insert(start, len, Arc::new(ops))?;
        let mut watch = Some(watch);
        let result = self.register_attempts(&sub, &mut watch, id, start, end, access);
        if result.is_err() {
            let _ = sub.remove();
            drop(watch);
        }
        result
    }

    fn register_attempts(
        &self,
        sub: &IntervalNotifier,
        watch: &mut Option<S::Watch>,
        id: u64,
        start: u64,
        end: u64,
        access: Access,
    ) -> Result<Entry<S, R>, CacheError> {
        let sh = &self.shared;
        let len = end - start;
        let mut made_room = false;
        let mut attempts = 0;
        while attempts < sh.config.max_attempts {
            let seq = sub.read_begin()?;
            sh.reserve(len)?;
            let handle = match sh.registrar.register(start, end, access) {
                Ok(h) => h,
                Err(e) => {
                    sh.lock().unreserve(len);
                    match e {
                        RegError::Exhausted(_) if !made_room => {
                            // libfabric's rule: flush what nobody uses, retry once.
                            made_room = true;
                            self.purge_unused();
                            continue;
                        }
                        RegError::Exhausted(source) => {
                            sh.stats.exhausted.fetch_add(1, Ordering::Relaxed);
                            return Err(CacheError::Exhausted { source });
                        }
                        RegError::Unsupported(source) => {
                            return Err(CacheError::Unsupported { start, len, source })
                        }
                        RegError::Other(e) => return Err(CacheError::Device(e)),
                    }
                }
            };
            sh.stats.registrations.fetch_add(1, Ordering::Relaxed);
            attempts += 1;
            // Changes that took effect while the device registered count.
            if let Err(e) = sh.space.flush() {
                sh.release_handle(handle, len);
                return Err(CacheError::AddressSpace(Box::new(e) as BoxError));
            }
            // Under the index lock, unless an invalidation collided.
            let mut handle = Some(handle);
            let committed = sh.index.commit(sub, seq, |ix| {
                let reg = Arc::new(Reg {
                    id,
                    start,
                    end,
                    access,
                    handle: handle.take().expect("taken once"),
                    sub: sub.clone(),
                    watch: Mutex::new(watch.take()),
                    valid: AtomicBool::new(false),
                    hashed: AtomicBool::new(false),
                    last_use: AtomicU64::new(0),
                    queued: AtomicU64::new(0),
                });
                ix.insert(reg.clone());
                let hit_key = sh.registrar.hit_key(&reg.handle);
                sh.hits.insert(ix, &reg, hit_key);
                sh.clock.store(ix.tick(), Ordering::Relaxed);
                let mut evicted = 0;
                while ix.len() > sh.config.max_cached {
                    let Some(victim) = ix.lru_victim(|r| sh.hits.last_use(r)) else {
                        break;
                    };
                    sh.unlink(ix, &victim);
                    evicted += 1;
                }
                (reg, evicted)
            });
            let Some((reg, evicted)) = committed else {
                sh.stats.retries.fetch_add(1, Ordering::Relaxed);
                sh.release_handle(handle.take().expect("not committed"), len);
                continue;
            };
            sh.stats.evicted.fetch_add(evicted, Ordering::Relaxed);
            return Ok(Entry {
                shared: sh.clone(),
                reg: Some(reg),
            });
        }
        sh.stats.busy.fetch_add(1, Ordering::Relaxed);
        Err(CacheError::Busy { attempts })
    }

    /// Tears down the registrations that left the cache (invalidated or
    /// evicted) since the last teardown: notifiers removed, watches
    /// dropped, device handles deregistered unless a guard still holds
    /// them (then the last guard deregisters). Runs by itself at every miss
    /// and, past [`Config::max_unreleased_bytes`], at hits.
    pub fn reap(&self) {
        self.shared.reap();
    }

    /// Takes every registration nobody holds out of the cache and
    /// deregisters it; returns how many. For memory pressure, and in a
    /// forked child, whose copy of the cache must not be used (its address
    /// space's monitor does not exist there).
    pub fn purge_unused(&self) -> usize {
        self.shared.reap();
        self.shared.evict_unused(None)
    }
}

impl<S: AddressSpace, R: Registrar> Drop for RegCache<S, R> {
    fn drop(&mut self) {
        self.shared.clear();
    }
}
