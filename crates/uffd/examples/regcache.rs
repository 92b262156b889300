//! A registration cache on this process's real memory: buffers are
//! registered, then several threads munmap, mremap and madvise some of them
//! while others look them up; the cache must stay exact (no lookup returns a
//! registration of memory that was changed before the lookup started).
//!
//! The two changing threads also reuse each other's addresses: one thread's
//! munmap frees a range before its event reaches the monitor, and the other
//! thread's mmap can get that range at once. That is why the cache runs with
//! [`FlushScope::Started`]; with `--returned` it runs with the default
//! [`FlushScope::Returned`] instead, and shows the few stale lookups that
//! scope allows (registrations of the old memory found at a new mapping of
//! the same addresses while the munmap that freed them has not returned).
//!
//! ```text
//! cargo run --release -p uffd --example regcache [-- --returned]
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use regcache::{Access, Config, RegCache};
use rustix::mm::{Advice, MapFlags, MremapFlags, ProtFlags};
use uffd::Populate;
use uffd::{FlushScope, ProcessMm};

const P: u64 = 4096;
const BUFFERS: usize = 32;
const PAGES: u64 = 8;

fn map(pages: u64) -> u64 {
    // SAFETY: a fresh anonymous mapping replaces nothing.
    unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            (pages * P) as usize,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .expect("mmap") as u64
}

/// One application buffer. Changes hold the write lock across the syscall
/// and lookups the read lock across the lookup, so "before the lookup" is
/// exact.
struct Buffer {
    addr: u64,
    generation: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scope = if std::env::args().any(|a| a == "--returned") {
        FlushScope::Returned
    } else {
        FlushScope::Started
    };
    let mm = match ProcessMm::with_scope(scope) {
        Ok(mm) => mm,
        Err(e) => {
            eprintln!("userfaultfd unavailable: {e}");
            std::process::exit(2);
        }
    };
    let cache = Arc::new(RegCache::with_config(
        mm.clone(),
        Populate,
        Config {
            max_cached: 256,
            ..Config::default()
        },
    ));
    let bufs: Arc<Vec<RwLock<Buffer>>> = Arc::new(
        (0..BUFFERS)
            .map(|i| {
                RwLock::new(Buffer {
                    addr: map(PAGES),
                    generation: (i as u64) << 32,
                })
            })
            .collect(),
    );
    let first_seen: Arc<Mutex<HashMap<u64, (usize, u64)>>> = Arc::default();
    let (stale, lookups, changes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let deadline = Instant::now() + Duration::from_secs(3);

    let mut threads = Vec::new();
    for t in 0..2u64 {
        let (bufs, changes) = (bufs.clone(), changes.clone());
        threads.push(std::thread::spawn(move || {
            let mut x = 0x2545_F491_4F6C_DD1D ^ t;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut b = bufs[(x % BUFFERS as u64) as usize].write().unwrap();
                let len = (PAGES * P) as usize;
                // SAFETY: the example's own buffers; no reference into them
                // is alive while the write lock is held.
                unsafe {
                    match (x >> 8) % 3 {
                        0 => {
                            rustix::mm::munmap(b.addr as *mut _, len).unwrap();
                            b.addr = map(PAGES);
                        }
                        1 => {
                            let to = map(PAGES);
                            rustix::mm::mremap_fixed(
                                b.addr as *mut _,
                                len,
                                len,
                                MremapFlags::MAYMOVE,
                                to as *mut _,
                            )
                            .unwrap();
                            b.addr = to;
                        }
                        _ => rustix::mm::madvise(b.addr as *mut _, len, Advice::LinuxDontNeed)
                            .unwrap(),
                    }
                }
                b.generation += 1;
                changes.fetch_add(1, Ordering::Relaxed);
                drop(b);
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    for t in 0..2u64 {
        let (cache, bufs, first_seen, stale, lookups) = (
            cache.clone(),
            bufs.clone(),
            first_seen.clone(),
            stale.clone(),
            lookups.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut i = t;
            while Instant::now() < deadline {
                i += 1;
                let k = (i.wrapping_mul(0x9E37_79B9) % BUFFERS as u64) as usize;
                let b = bufs[k].read().unwrap();
                let off = (i % PAGES) * P;
                let r = cache.get(b.addr + off, P, Access::READ_WRITE).unwrap();
                let seen = *first_seen
                    .lock()
                    .unwrap()
                    .entry(r.id())
                    .or_insert((k, b.generation));
                // (Validity alone is no test: the LRU limit evicts.)
                if seen != (k, b.generation) {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                lookups.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let s = cache.stats();
    let e = mm.stats();
    println!(
        "{} lookups ({} hits, {} misses) against {} munmap/mremap/madvise calls",
        lookups.load(Ordering::Relaxed),
        s.hits.load(Ordering::Relaxed),
        s.misses.load(Ordering::Relaxed),
        changes.load(Ordering::Relaxed),
    );
    println!(
        "events: {} unmap, {} remove, {} remap; {} registrations invalidated; {} lookups waited for the monitor",
        e.unmaps.load(Ordering::Relaxed),
        e.removes.load(Ordering::Relaxed),
        e.remaps.load(Ordering::Relaxed),
        s.invalidated.load(Ordering::Relaxed),
        e.flush_waits.load(Ordering::Relaxed),
    );
    let stale = stale.load(Ordering::Relaxed);
    println!("flush scope {scope:?}: stale registrations returned: {stale}");
    if stale != 0 && scope == FlushScope::Started {
        return Err("the cache returned stale registrations".into());
    }
    if stale != 0 {
        println!(
            "(FlushScope::Returned only covers changes that returned before the lookup; \
             these lookups raced a munmap whose addresses were already mapped again)"
        );
    }
    Ok(())
}
