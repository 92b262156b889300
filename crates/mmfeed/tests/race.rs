//! The races the feed exists for, on real memory, each counted: a
//! registration cache lookup must never return a registration of memory
//! that was unmapped before the lookup started.
//!
//! The "device" registers a page by reading the tag its mapper wrote into
//! it (through process_vm_readv, so an unmapped page is an error, as a pin
//! would be): a registration's handle is the tag of the memory it holds.
//! Every thread maps a page, writes a fresh tag, looks the page up and
//! compares: a different tag is a registration of an earlier mapping at
//! the same address, which a munmap ended before this mapping existed:
//! stale. (A page is registered only once tagged, so a registration never
//! holds the right memory under a tag about to change.)

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mmfeed::FeedMm;
use regcache::{Access, RegCache};

static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

#[derive(Default)]
struct Tally {
    lookups: AtomicU64,
    hits: AtomicU64,
    stale: AtomicU64,
}

impl Tally {
    /// Tags the page mapped at `q` afresh, looks it up (with `get`, then
    /// with the lock-free hit alone, which reads the tag from the hit
    /// table's slot) and counts the lookups (a registration holding another
    /// tag is stale), then unmaps
    /// the page with the raw system call (no libc wrapper or allocator
    /// between the unmap and the feed).
    fn look_up_fresh(&self, cache: &RegCache<FeedMm, TagDevice>, q: u64) {
        let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
        write_tag(q, tag);
        let hits_before = cache.stats().hits.load(Ordering::Relaxed);
        if let Ok(e) = cache.get(q, P, Access::READ) {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            if cache.stats().hits.load(Ordering::Relaxed) != hits_before {
                self.hits.fetch_add(1, Ordering::Relaxed);
            }
            if *e.handle() != tag {
                self.stale.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The lock-free hit alone, deciding from the hit table's slot (its
        // tags and the device's hit key, the tag) without the registration.
        if let Ok(Some(key)) = cache.with_hit(q, P, Access::READ, |h| h.key()) {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            self.hits.fetch_add(1, Ordering::Relaxed);
            if key != tag {
                self.stale.fetch_add(1, Ordering::Relaxed);
            }
        }
        assert_eq!(raw_munmap(q, P), 0);
    }

    /// Prints the counts; asserts the race ran and nothing was stale.
    fn assert_none_stale(&self, race: &str) {
        let lookups = self.lookups.load(Ordering::Relaxed);
        let hits = self.hits.load(Ordering::Relaxed);
        let stale = self.stale.load(Ordering::Relaxed);
        eprintln!("{race}: {lookups} lookups ({hits} hits), {stale} stale");
        assert!(lookups > 200, "the race ran ({lookups} lookups)");
        assert_eq!(stale, 0, "{stale} stale registrations in {lookups} lookups");
    }
}

/// Threads that map a page, tag it, look it up and unmap it, over and over,
/// for `run`.
fn reuse_race(mm: FeedMm, threads: usize, run: Duration) -> Arc<Tally> {
    let cache = tag_cache(mm);
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (cache, tally) = (cache.clone(), tally.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + run;
                while Instant::now() < until {
                    tally.look_up_fresh(&cache, map(1));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    tally
}

/// Threads reuse each other's freed addresses at once (the kernel hands a
/// freed page to the next mmap): every lookup's flush must see the munmap
/// that freed the address before the mmap that reused it returned.
#[test]
fn addresses_reused_across_threads_never_hit_a_stale_registration() {
    let Some(mm) = feed_mm() else { return };
    reuse_race(mm, 3, seconds()).assert_none_stale("reuse race");
}

/// A registration made while a munmap of its page is in flight (START
/// published, the pages not yet gone) must not be committed: the flush
/// before the commit waits for the munmap's END, so the collision check
/// sees it. Thread B maps, tags and unmaps pages; threads A register
/// whatever page B has right now; thread R maps pages of its own (reusing
/// B's freed addresses) and checks every lookup.
#[test]
fn a_registration_racing_an_munmap_in_flight_is_never_committed_stale() {
    let Some(mm) = feed_mm() else { return };
    let cache = tag_cache(mm);
    let until = Instant::now() + seconds();
    let current = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let unmapper = {
        let current = current.clone();
        std::thread::spawn(move || {
            while Instant::now() < until {
                let p = map(1);
                write_tag(p, NEXT_TAG.fetch_add(1, Ordering::Relaxed));
                current.store(p, Ordering::Release);
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
                assert_eq!(raw_munmap(p, P), 0);
            }
        })
    };
    let registrars: Vec<_> = (0..2)
        .map(|_| {
            let (cache, current) = (cache.clone(), current.clone());
            std::thread::spawn(move || {
                while Instant::now() < until {
                    let p = current.load(Ordering::Acquire);
                    if p != 0 {
                        let _ = cache.get(p, P, Access::READ);
                    }
                }
            })
        })
        .collect();
    let reuser = {
        let (cache, tally) = (cache.clone(), tally.clone());
        std::thread::spawn(move || {
            while Instant::now() < until {
                tally.look_up_fresh(&cache, map(1));
            }
        })
    };
    unmapper.join().unwrap();
    for r in registrars {
        r.join().unwrap();
    }
    reuser.join().unwrap();
    let retries = cache.stats().retries.load(Ordering::Relaxed);
    eprintln!("registration race: {retries} registrations retried");
    tally.assert_none_stale("registration race");
}

/// The window itself: thread M registers a page and unmaps it; thread R
/// keeps asking the kernel for that very address (a hint, no `MAP_FIXED`)
/// and gets it the moment M's munmap lets go of it, while that munmap has
/// not yet returned; R then looks it up. Only a feed published at syscall
/// entry (and a flush that applies what it finds) keeps that lookup from
/// hitting M's registration.
#[test]
fn an_address_reused_before_its_munmap_returns_never_hits_stale() {
    use std::sync::atomic::AtomicBool;
    let Some(mm) = feed_mm() else { return };
    let cache = tag_cache(mm);
    let until = Instant::now() + seconds();
    // The address M registered and is about to unmap (0: none yet).
    let target = Arc::new(AtomicU64::new(0));
    // R took the address and looked it up: M may go on.
    let done = Arc::new(AtomicBool::new(true));
    let tally = Arc::new(Tally::default());
    let reuser = {
        let (cache, target, done, tally) =
            (cache.clone(), target.clone(), done.clone(), tally.clone());
        std::thread::spawn(move || {
            let mut tries = 0;
            while Instant::now() < until {
                let a = target.load(Ordering::Acquire);
                if a == 0 || done.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                    continue;
                }
                let q = map_at(a);
                if q != a {
                    assert_eq!(raw_munmap(q, P), 0);
                    // Another thread of the process took the address: let
                    // M go on with a new one.
                    tries += 1;
                    if tries == 100_000 {
                        tries = 0;
                        done.store(true, Ordering::Release);
                    }
                    continue;
                }
                tries = 0;
                tally.look_up_fresh(&cache, q);
                done.store(true, Ordering::Release);
            }
            done.store(true, Ordering::Release);
        })
    };
    while Instant::now() < until {
        if !done.load(Ordering::Acquire) {
            std::hint::spin_loop();
            continue;
        }
        let p = map_at(target.load(Ordering::Relaxed));
        write_tag(p, NEXT_TAG.fetch_add(1, Ordering::Relaxed));
        drop(cache.get(p, P, Access::READ));
        target.store(p, Ordering::Release);
        done.store(false, Ordering::Release);
        assert_eq!(raw_munmap(p, P), 0);
    }
    reuser.join().unwrap();
    tally.assert_none_stale("reuse in the window");
}
