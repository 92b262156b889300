//! Threads racing lookups against munmap / mremap / madvise / MAP_FIXED:
//! a lookup that starts after a change returned never gets a registration
//! made before it; with `FlushScope::Started`, not even when the change is a
//! munmap by another thread that has not returned yet but whose addresses a
//! new mapping already reuses.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use common::*;
use regcache::Access;
use rustix::mm::Advice;

const SLOTS: usize = 8;
const PAGES: u64 = 4;

/// Changes replace or discard a whole slot, so every registration in it is
/// invalidated.
const MIN_CHANGES: u64 = 2_000;

/// One buffer: its address and mapping generation. Changes hold the write
/// lock across the syscall, lookups the read lock across the lookup, so
/// "after the change returned" is exact.
struct Slot {
    addr: u64,
    generation: u64,
}

/// One thread changes the buffers: every change a lookup can see has
/// returned, which `FlushScope::Returned` covers.
#[test]
fn racing_lookups_get_no_stale_registration() {
    let _serial = serial();
    let Some(mm) = process_mm() else { return };
    race(mm, 1);
}

/// Two threads change the buffers and reuse each other's freed addresses (a
/// munmap frees its range before its event is even queued, and the other
/// thread's mmap gets it): `FlushScope::Started` waits for those events too.
/// With `FlushScope::Returned` this workload returns a few stale
/// registrations per ten million lookups (see the regcache example's
/// `--returned`).
#[test]
fn two_threads_reusing_addresses_get_no_stale_registration_with_started_scope() {
    let _serial = serial();
    let Some(mm) = process_mm_with(uffd::FlushScope::Started) else {
        return;
    };
    race(mm, 2);
}

fn race(mm: uffd::ProcessMm, mutators: u64) {
    let lookups_per_thread: u64 = std::env::var("UFFD_RACE_LOOKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25_000);
    let cache = Arc::new(common::cache(&mm, 1024));
    let slots: Arc<Vec<RwLock<Slot>>> = Arc::new(
        (0..SLOTS)
            .map(|i| {
                RwLock::new(Slot {
                    addr: map(PAGES),
                    generation: i as u64 * 1_000_000,
                })
            })
            .collect(),
    );
    // Registration id -> (slot, generation) at its first sighting, which is
    // under the read lock of the lookup that created it.
    let seen: Arc<Mutex<HashMap<u64, (usize, u64)>>> = Arc::default();
    let stale = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));

    let mutators: Vec<_> = (0..mutators)
        .map(|m| {
            let (slots, done, changes) = (slots.clone(), done.clone(), changes.clone());
            std::thread::spawn(move || {
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (m << 17);
                while !done.load(Ordering::Relaxed) {
                    xorshift(&mut x);
                    let mut s = slots[(x % SLOTS as u64) as usize].write().unwrap();
                    match (x >> 8) % 4 {
                        0 => {
                            unmap(s.addr, PAGES);
                            s.addr = map(PAGES);
                        }
                        1 => advise(s.addr, PAGES, Advice::LinuxDontNeed),
                        2 => map_fixed(s.addr, PAGES),
                        _ => {
                            // A move onto a fresh mapping (MREMAP_FIXED replaces
                            // it).
                            let to = map(PAGES);
                            // SAFETY: moving the test's own mapping onto the one
                            // just made; no reference into either is alive.
                            let moved = unsafe {
                                rustix::mm::mremap_fixed(
                                    s.addr as *mut _,
                                    (PAGES * P) as usize,
                                    (PAGES * P) as usize,
                                    rustix::mm::MremapFlags::MAYMOVE,
                                    to as *mut _,
                                )
                            };
                            moved.expect("mremap");
                            s.addr = to;
                        }
                    }
                    s.generation += 1;
                    changes.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                    std::thread::yield_now();
                }
            })
        })
        .collect();

    let lookers: Vec<_> = (0..4u64)
        .map(|t| {
            let (cache, slots, seen, stale, changes) = (
                cache.clone(),
                slots.clone(),
                seen.clone(),
                stale.clone(),
                changes.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0;
                while i < lookups_per_thread || changes.load(Ordering::Relaxed) < MIN_CHANGES {
                    i += 1;
                    if i % 8 == 0 {
                        // Let the mutator in.
                        std::thread::yield_now();
                    }
                    let k = ((i * 7 + t * 3) % SLOTS as u64) as usize;
                    let s = slots[k].read().unwrap();
                    let off = (i % PAGES) * P;
                    let r = cache
                        .get(
                            s.addr + off,
                            P,
                            if i % 2 == 0 {
                                Access::READ_WRITE
                            } else {
                                Access::READ
                            },
                        )
                        .unwrap();
                    let first = *seen
                        .lock()
                        .unwrap()
                        .entry(r.id())
                        .or_insert((k, s.generation));
                    if first != (k, s.generation) || !r.is_valid() {
                        stale.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i
            })
        })
        .collect();
    let lookups: u64 = lookers.into_iter().map(|l| l.join().unwrap()).sum();
    done.store(true, Ordering::Relaxed);
    for m in mutators {
        m.join().unwrap();
    }

    let st = cache.stats();
    let (hits, misses) = (
        st.hits.load(Ordering::Relaxed),
        st.misses.load(Ordering::Relaxed),
    );
    eprintln!(
        "{} lookups ({hits} hits, {misses} misses), {} changes, {} invalidated, {} flush waits, 0 expected stale: {}",
        lookups,
        changes.load(Ordering::Relaxed),
        st.invalidated.load(Ordering::Relaxed),
        mm.stats().flush_waits.load(Ordering::Relaxed),
        stale.load(Ordering::Relaxed),
    );
    assert_eq!(
        stale.load(Ordering::Relaxed),
        0,
        "stale registrations returned"
    );
    assert!(hits > 0 && misses > 0 && changes.load(Ordering::Relaxed) > 0);
    assert!(st.invalidated.load(Ordering::Relaxed) > 0);
}
