//! [`RegCache`]: lookups, the registration protocol, eviction and reaping.

use std::fmt;
use std::sync::Arc;

use mmu_notifier::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use mmu_notifier::{DriverLock, IntervalNotifier, PAGE_SIZE};

use crate::config::{CacheStats, Config, Usage};
use crate::entry::{Entry, Hit};
use crate::hits::HitTable;
use crate::index::Index;
use crate::reg::Reg;
use crate::registrar::BoxError;
use crate::state::{CacheState, RegOps};
use crate::{Access, AddressSpace, CacheError, RegError, Registrar};

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
