//! The cache's lifecycle guarantees, with an address space whose primary
//! calls the hooks itself and a device that records what it is asked.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use mmu_notifier::{Event, Range, Subscriptions};
use regcache::{Access, AddressSpace, CacheError, Config, Limits, RegCache, RegError, Registrar};

const P: u64 = 4096;

/// Live watches are counted.
#[derive(Default)]
struct Space {
    /// The primary's handle, shared with a test device that races it.
    subs: Arc<Subscriptions>,
    watches: Arc<AtomicUsize>,
}

struct Watch(Arc<AtomicUsize>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AddressSpace for Space {
    type Watch = Watch;
    type Error = std::convert::Infallible;
    fn subscriptions(&self) -> &mmu_notifier::SubscriptionsRef {
        &self.subs
    }
    fn watch(&self, _: u64, _: u64) -> Result<Watch, Self::Error> {
        self.watches.fetch_add(1, Ordering::Relaxed);
        Ok(Watch(self.watches.clone()))
    }
}

impl Space {
    fn unmap(&self, start: u64, end: u64) {
        self.subs
            .invalidate_range_start(Range::new(start, end, Event::Unmap).unwrap())
            .end();
    }
}

/// A device that records its handles; what it does next is scripted.
#[derive(Default)]
struct Device {
    next: AtomicU64,
    live: Arc<Mutex<HashSet<u64>>>,
    registers: AtomicU64,
    deregisters: AtomicU64,
    /// Deregistrations of a handle that was not live (double or unknown).
    bad_deregisters: Arc<AtomicU64>,
    /// Threads that deregistered.
    threads: Mutex<Vec<ThreadId>>,
    fail: Mutex<Vec<RegError>>,
    limits: Option<Limits>,
    /// Every register call invalidates the range first (a racing munmap).
    race: Option<Arc<Subscriptions>>,
    align: u64,
}

impl Registrar for Device {
    type Handle = u64;
    fn register(&self, start: u64, end: u64, _: Access) -> Result<u64, RegError> {
        self.registers.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = self.fail.lock().unwrap().pop() {
            return Err(e);
        }
        if let Some(subs) = &self.race {
            subs.invalidate_range_start(Range::new(start, end, Event::Clear).unwrap())
                .end();
        }
        let h = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.lock().unwrap().insert(h);
        Ok(h)
    }
    fn deregister(&self, h: u64) -> Result<(), RegError> {
        self.deregisters.fetch_add(1, Ordering::Relaxed);
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if !self.live.lock().unwrap().remove(&h) {
            self.bad_deregisters.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
    fn align(&self, start: u64, end: u64) -> (u64, u64) {
        match self.align {
            0 => (start, end),
            a => (start / a * a, end.div_ceil(a) * a),
        }
    }
    fn hit_key(&self, h: &u64) -> u64 {
        *h ^ HIT_KEY
    }
    fn limits(&self) -> Limits {
        self.limits.unwrap_or(Limits::NONE)
    }
}

impl Device {
    fn live(&self) -> usize {
        self.live.lock().unwrap().len()
    }
}

fn cache(dev: Device) -> RegCache<Space, Device> {
    RegCache::new(Space::default(), dev)
}

#[test]
fn a_hit_needs_a_superset_of_the_access_and_of_the_range() {
    let c = cache(Device::default());
    let rw = c.get(0x10000, 2 * P, Access::READ_WRITE).unwrap();
    assert_eq!((rw.start(), rw.end()), (0x10000, 0x10000 + 2 * P));
    assert_eq!(c.get(0x10010, 100, Access::READ).unwrap().id(), rw.id());
    assert_eq!(c.get(0x10000, 2 * P, Access::WRITE).unwrap().id(), rw.id());
    // Not covered: more access, or a longer range.
    assert_ne!(
        c.get(0x10000, P, Access::REMOTE_READ).unwrap().id(),
        rw.id()
    );
    assert_ne!(c.get(0x10000, 3 * P, Access::READ).unwrap().id(), rw.id());
    // A read-only registration does not serve a lookup that also writes.
    let ro = c.get(0x80000, P, Access::READ).unwrap();
    assert_ne!(c.get(0x80000, P, Access::READ_WRITE).unwrap().id(), ro.id());
    assert_eq!(c.stats().hits.load(Ordering::Relaxed), 2);
    assert_eq!(c.stats().misses.load(Ordering::Relaxed), 5);
}

#[test]
fn deregistration_happens_once_after_the_last_guard_and_outside_callbacks() {
    let c = cache(Device::default());
    let e = c.get(0x20000, P, Access::READ).unwrap();
    let e2 = e.clone();
    // Invalidated from another thread (a userfaultfd monitor, say).
    let space = &c.space().subs;
    let invalidator = std::thread::scope(|s| {
        s.spawn(|| {
            space
                .invalidate_range_start(Range::new(0x20000, 0x21000, Event::Unmap).unwrap())
                .end();
            std::thread::current().id()
        })
        .join()
        .unwrap()
    });
    assert!(!e.is_valid() && !e2.is_valid());
    assert_eq!(c.registrar().deregisters.load(Ordering::Relaxed), 0);
    c.reap(); // left the cache, but guards hold it
    assert_eq!(c.registrar().deregisters.load(Ordering::Relaxed), 0);
    assert_eq!(c.usage().live_handles, 1);
    assert_eq!(c.usage().unreleased_bytes, P);
    drop(e);
    assert_eq!(c.registrar().deregisters.load(Ordering::Relaxed), 0);
    drop(e2); // the last guard deregisters, on this thread
    let d = c.registrar();
    assert_eq!(d.deregisters.load(Ordering::Relaxed), 1);
    assert_eq!(d.bad_deregisters.load(Ordering::Relaxed), 0);
    assert!(!d.threads.lock().unwrap().contains(&invalidator));
    assert_eq!(c.usage().live_handles, 0);
    assert_eq!(c.usage().unreleased_bytes, 0);
    assert_eq!(c.space().watches.load(Ordering::Relaxed), 0);
}

#[test]
fn a_guard_outliving_the_cache_deregisters_when_dropped() {
    let c = cache(Device::default());
    let (e, dropped) = (
        c.get(0x30000, P, Access::READ).unwrap(),
        c.get(0x40000, P, Access::READ).unwrap(),
    );
    drop(dropped);
    let (watches, live) = (c.space().watches.clone(), c.registrar().live.clone());
    // The cache's drop deregisters what nobody holds; the held one waits.
    drop(c);
    assert!(!e.is_valid());
    assert_eq!(
        watches.load(Ordering::Relaxed),
        0,
        "notifiers and watches go with the cache"
    );
    assert_eq!(live.lock().unwrap().len(), 1);
    drop(e);
    assert!(live.lock().unwrap().is_empty());
}

#[test]
fn every_handle_is_deregistered_exactly_once_under_concurrency() {
    let c = Arc::new(cache(Device::default()));
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = c.clone();
            s.spawn(move || {
                let mut x = t + 1;
                let mut held = Vec::new();
                for i in 0..2000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = 0x100000 + (x % 64) * P;
                    match i % 4 {
                        0 => c.space().unmap(page, page + 2 * P),
                        1 if held.len() > 4 => drop(held.swap_remove(0)),
                        _ => held.push(c.get(page, P, Access::READ).unwrap()),
                    }
                }
            });
        }
    });
    let c = Arc::into_inner(c).unwrap();
    assert_eq!(
        c.registrar().registers.load(Ordering::Relaxed),
        c.stats().registrations.load(Ordering::Relaxed)
    );
    assert_eq!(c.usage().live_handles, c.registrar().live());
    let (live, bad) = (
        c.registrar().live.clone(),
        c.registrar().bad_deregisters.clone(),
    );
    drop(c);
    assert!(live.lock().unwrap().is_empty(), "every handle deregistered");
    assert_eq!(bad.load(Ordering::Relaxed), 0, "none twice");
}

#[test]
fn device_limits_count_invalidated_handles_still_held() {
    let c = cache(Device {
        limits: Some(Limits {
            max_handles: 2,
            max_bytes: u64::MAX,
            max_len: 4 * P,
        }),
        ..Device::default()
    });
    let a = c.get(0x10000, P, Access::READ).unwrap();
    let b = c.get(0x20000, P, Access::READ).unwrap();
    c.space().unmap(0x10000, 0x11000); // `a` invalid but held
    let e = c.get(0x30000, P, Access::READ).unwrap_err();
    assert!(
        matches!(e, CacheError::Exhausted { .. }) && e.fall_back(),
        "{e}"
    );
    drop(a);
    let c3 = c.get(0x30000, P, Access::READ).unwrap();
    // Full again; `b` is unused once dropped, and is evicted to make room.
    drop(b);
    let c4 = c.get(0x40000, P, Access::READ).unwrap();
    assert!(c3.is_valid() && c4.is_valid());
    assert_eq!(c.registrar().live(), 2);
    assert_eq!(c.stats().evicted.load(Ordering::Relaxed), 1);
    // Longer than the device allows: fall back.
    let e = c.get(0x50000, 5 * P, Access::READ).unwrap_err();
    assert!(
        matches!(e, CacheError::Unsupported { .. }) && e.fall_back(),
        "{e}"
    );
}

#[test]
fn an_exhausted_device_gets_room_and_one_retry() {
    let c = cache(Device::default());
    let unused = c.get(0x10000, P, Access::READ).unwrap();
    drop(unused);
    let held = c.get(0x20000, P, Access::READ).unwrap();
    c.registrar()
        .fail
        .lock()
        .unwrap()
        .push(RegError::exhausted("no keys"));
    let e = c.get(0x30000, P, Access::READ).unwrap();
    assert!(e.is_valid() && held.is_valid());
    assert_eq!(c.registrar().live(), 2, "the unused registration made room");
    // Exhausted twice in a row: the error.
    for _ in 0..2 {
        c.registrar()
            .fail
            .lock()
            .unwrap()
            .push(RegError::exhausted("no keys"));
    }
    let before = c.registrar().registers.load(Ordering::Relaxed);
    assert!(matches!(
        c.get(0x40000, P, Access::READ),
        Err(CacheError::Exhausted { .. })
    ));
    assert_eq!(c.registrar().registers.load(Ordering::Relaxed) - before, 2);
    assert_eq!(
        c.space().watches.load(Ordering::Relaxed),
        2,
        "the failed lookup's watch is gone"
    );
}

#[test]
fn unsupported_memory_and_device_errors_leave_nothing_behind() {
    let c = cache(Device::default());
    c.registrar()
        .fail
        .lock()
        .unwrap()
        .push(RegError::unsupported("file mapping"));
    let e = c.get(0x10000, P, Access::READ).unwrap_err();
    assert!(
        matches!(e, CacheError::Unsupported { .. }) && e.fall_back(),
        "{e}"
    );
    c.registrar()
        .fail
        .lock()
        .unwrap()
        .push(RegError::other("EIO"));
    let e = c.get(0x10000, P, Access::READ).unwrap_err();
    assert!(matches!(e, CacheError::Device(_)) && !e.fall_back(), "{e}");
    assert_eq!(c.space().watches.load(Ordering::Relaxed), 0);
    assert_eq!(c.usage().live_handles, 0);
    assert!(!c.space().subs.has_notifiers() || c.is_empty());
}

#[test]
fn a_range_invalidated_at_every_attempt_gives_busy_after_a_bounded_number() {
    let space = Space::default();
    let subs = Arc::new(Subscriptions::new());
    let space = Space {
        subs: subs.clone(),
        ..space
    };
    let dev = Device {
        race: Some(subs),
        ..Device::default()
    };
    let c = RegCache::with_config(
        space,
        dev,
        Config {
            max_attempts: 5,
            ..Config::default()
        },
    );
    let e = c.get(0x10000, P, Access::READ).unwrap_err();
    assert!(matches!(e, CacheError::Busy { attempts: 5 }), "{e}");
    let d = c.registrar();
    assert_eq!(d.registers.load(Ordering::Relaxed), 5, "bounded");
    assert_eq!(
        d.deregisters.load(Ordering::Relaxed),
        5,
        "each raced handle released"
    );
    assert_eq!(c.stats().retries.load(Ordering::Relaxed), 5);
    assert_eq!(
        c.space().watches.load(Ordering::Relaxed),
        0,
        "one watch, kept across attempts, then dropped"
    );
}

#[test]
fn purge_unused_keeps_what_guards_hold() {
    let c = cache(Device::default());
    let held = c.get(0x10000, P, Access::READ).unwrap();
    drop(c.get(0x20000, P, Access::READ).unwrap());
    drop(c.get(0x30000, P, Access::READ).unwrap());
    assert_eq!(c.purge_unused(), 2);
    assert_eq!(c.registrar().live(), 1);
    assert!(held.is_valid());
    assert_eq!(c.get(0x10000, P, Access::READ).unwrap().id(), held.id());
}

#[test]
fn past_the_unreleased_bound_hits_tear_down_what_left_the_cache() {
    for (bound, deregistered_by_a_hit) in [(0, 1), (u64::MAX, 0)] {
        let c = RegCache::with_config(
            Space::default(),
            Device::default(),
            Config {
                max_unreleased_bytes: bound,
                ..Config::default()
            },
        );
        let keep = c.get(0x10000, P, Access::READ).unwrap();
        drop(c.get(0x20000, P, Access::READ).unwrap());
        c.space().unmap(0x20000, 0x21000);
        assert_eq!(c.get(0x10000, P, Access::READ).unwrap().id(), keep.id());
        assert_eq!(
            c.registrar().deregisters.load(Ordering::Relaxed),
            deregistered_by_a_hit,
            "bound {bound}"
        );
    }
}

#[test]
fn the_lru_limit_evicts_the_least_recently_used() {
    let c = RegCache::with_config(
        Space::default(),
        Device::default(),
        Config {
            max_cached: 2,
            ..Config::default()
        },
    );
    let x = c.get(0x10000, P, Access::READ).unwrap();
    let y = c.get(0x20000, P, Access::READ).unwrap();
    let _ = c.get(0x10000, P, Access::READ).unwrap(); // x used again
    let z = c.get(0x30000, P, Access::READ).unwrap();
    assert!(x.is_valid() && !y.is_valid() && z.is_valid());
    assert_eq!(c.len(), 2);
}

#[test]
fn bad_requests_and_a_bad_align_hook_are_errors() {
    let c = cache(Device::default());
    for (start, len, access) in [
        (0x1000, 0, Access::READ),
        (0x1000, P, Access::empty()),
        (u64::MAX - 10, P, Access::READ),
    ] {
        let e = c.get(start, len, access).unwrap_err();
        assert!(
            matches!(e, CacheError::InvalidRequest { .. }) && !e.fall_back(),
            "{e}"
        );
    }
    let gpu = cache(Device {
        align: 64 << 10,
        ..Device::default()
    });
    let e = gpu.get(0x12345, 100, Access::READ).unwrap();
    assert_eq!((e.start(), e.len()), (0x10000, 64 << 10));
    assert_eq!(gpu.get(0x1f000, P, Access::READ).unwrap().id(), e.id());
    let bad = cache(Device {
        align: 3000,
        ..Device::default()
    });
    assert!(matches!(
        bad.get(0x10000, P, Access::READ),
        Err(CacheError::Device(_))
    ));
}

/// More registrations starting in one page than the lock-free table's
/// probe window holds: the table does not grow for them (it would grow
/// without end: they all hash alike), and every lookup still hits.
#[test]
fn many_registrations_starting_in_one_page_are_all_found() {
    let c = cache(Device::default());
    let guards: Vec<_> = (1..=20u64)
        .map(|k| c.get(0x100000, k * P, Access::READ).unwrap())
        .collect();
    assert_eq!(c.len(), 20);
    let registered = c.stats().registrations.load(Ordering::Relaxed);
    for k in 1..=20u64 {
        let e = c.get(0x100000, k * P, Access::READ).unwrap();
        assert!(e.len() >= k * P);
        let lock_free = c
            .with_hit(0x100000, k * P, Access::READ, |h| h.end() - h.start())
            .unwrap();
        assert!(!matches!(lock_free, Some(len) if len < k * P));
    }
    assert_eq!(c.stats().registrations.load(Ordering::Relaxed), registered);
    assert_eq!(c.stats().hits.load(Ordering::Relaxed), 20);
    drop(guards);
}

/// The lock-free hit: it finds what `get` registered, never a registration
/// an invalidation took out, and needs the same access and range.
/// What the test device's `hit_key` mixes into a handle (so a slot's key
/// that were the handle itself, or 0, shows).
const HIT_KEY: u64 = 0x5a5a_0000;

#[test]
fn with_hit_finds_cached_registrations_and_not_invalidated_ones() {
    let c = cache(Device::default());
    let e = c.get(0x10000, 2 * P, Access::READ).unwrap();
    let hit = |start, len, access| c.with_hit(start, len, access, |h| h.id()).unwrap();
    assert_eq!(hit(0x10000, P, Access::READ), Some(e.id()));
    // What the hit table's slot keeps: the range and the device's hit key.
    let seen = c.with_hit(0x10000, P, Access::READ, |h| {
        (h.start(), h.end(), h.key(), *h.handle())
    });
    assert_eq!(
        seen.unwrap(),
        Some((0x10000, 0x10000 + 2 * P, *e.handle() ^ HIT_KEY, *e.handle()))
    );
    assert_eq!(hit(0x10000 + 8, 2 * P - 8, Access::READ), Some(e.id()));
    assert_eq!(hit(0x10000, 3 * P, Access::READ), None);
    assert_eq!(hit(0x10000, P, Access::READ_WRITE), None);
    // Not starting in the registration's first page: the locked lookup's.
    assert_eq!(hit(0x11000, P, Access::READ), None);
    assert_eq!(c.get(0x11000, P, Access::READ).unwrap().id(), e.id());
    // An entry taken from a hit keeps the registration like any guard.
    let kept = c
        .with_hit(0x10000, P, Access::READ, |h| h.entry())
        .unwrap()
        .unwrap();
    c.space().unmap(0x11000, 0x12000);
    assert_eq!(hit(0x10000, P, Access::READ), None);
    assert!(!kept.is_valid());
    assert!(matches!(
        c.with_hit(0x10000, 0, Access::READ, |_| ()),
        Err(regcache::CacheError::InvalidRequest { .. })
    ));
    drop((e, kept));
    c.reap();
    assert_eq!(c.registrar().live(), 0);
}

/// A registration taken out of the cache while a lock-free hit uses it is
/// deregistered only after the hit's closure returned: the teardown waits
/// for the grace period that frees its slot in the hit table.
#[test]
fn a_registration_is_not_deregistered_under_a_running_hit() {
    let c = Arc::new(cache(Device::default()));
    drop(c.get(0x10000, P, Access::READ).unwrap());
    let (inside_tx, inside_rx) = std::sync::mpsc::channel();
    let hitter = {
        let c = c.clone();
        std::thread::spawn(move || {
            c.with_hit(0x10000, P, Access::READ, |h| {
                inside_tx.send(()).unwrap();
                // Long enough for the other thread's invalidation and reap
                // to deregister, if they did not wait for this section.
                std::thread::sleep(std::time::Duration::from_millis(200));
                (
                    *h.handle(),
                    c.registrar().deregisters.load(Ordering::SeqCst),
                )
            })
            .unwrap()
            .unwrap()
        })
    };
    inside_rx.recv().unwrap();
    c.space().unmap(0x10000, 0x11000);
    c.reap();
    let (handle, deregistered_meanwhile) = hitter.join().unwrap();
    assert_eq!(
        deregistered_meanwhile, 0,
        "deregistered under a running hit"
    );
    assert_eq!(c.registrar().deregisters.load(Ordering::SeqCst), 1);
    assert!(!c.registrar().live.lock().unwrap().contains(&handle));
}
