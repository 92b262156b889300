//! io_uring fixed buffers through one shared registration cache, end to end
//! on this process's real memory: several threads allocate, free and
//! reallocate buffers with glibc (large blocks really munmapped and
//! mremapped), map and unmap raw memory, madvise it away, and READ_FIXED a
//! file with known contents into their buffers through the cache. Every
//! byte read is verified: a stale fixed buffer returns the full count but
//! leaves the buffer untouched (the data went into the old pages).
//!
//! `E2E_READS` (reads per thread) and `E2E_SCOPE=returned` (the cheap flush
//! scope) tune it; the `#[ignore]`d test measures the data-loss rate of
//! `FlushScope::Returned`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{pattern_file, skip, Ring};
use regcache::{Access, AddressSpace, Config, RegCache};
use uffd::{FlushScope, ProcessMm};
use uring_registrar::UringRegistrar;

const P: u64 = 4096;
const THREADS: u64 = 4;
const FILE_LEN: usize = 8 << 20;
const MAX_BUF: u64 = 1 << 20;
/// Buffers each thread keeps live at most.
const LIVE: usize = 8;
/// Large blocks come from mmap and go back with munmap / mremap.
const MMAP_THRESHOLD: i32 = 64 << 10;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[derive(Clone, Copy)]
enum Kind {
    /// glibc malloc / realloc / free.
    Malloc,
    /// A raw anonymous mmap, released with a raw munmap syscall.
    Mmap,
}

#[derive(Clone, Copy)]
struct Buf {
    addr: u64,
    len: u64,
    kind: Kind,
}

fn alloc(x: &mut u64) -> Buf {
    let len = P + xorshift(x) % (MAX_BUF - P);
    if xorshift(x) % 3 == 0 {
        Buf {
            addr: common::anon(len),
            len,
            kind: Kind::Mmap,
        }
    } else {
        // SAFETY: plain malloc; freed by `release`.
        let p = unsafe { libc::malloc(len as usize) };
        assert!(!p.is_null(), "malloc");
        Buf {
            addr: p as u64,
            len,
            kind: Kind::Malloc,
        }
    }
}

fn release(b: Buf) {
    // SAFETY: `b` is the thread's own live buffer; nothing refers to it.
    unsafe {
        match b.kind {
            Kind::Malloc => libc::free(b.addr as *mut _),
            Kind::Mmap => {
                // The raw syscall: no libc wrapper sees it.
                assert_eq!(libc::syscall(libc::SYS_munmap, b.addr, b.len), 0, "munmap");
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    bad: AtomicU64,
    fallbacks: AtomicU64,
    /// Reads submitted inside a lock-free hit, with the buffer index the
    /// hit table's slot keeps (`Hit::key`).
    lock_free: AtomicU64,
    bytes: AtomicU64,
    frees: AtomicU64,
    reallocs: AtomicU64,
    dontneeds: AtomicU64,
}

/// An address space that never reports a change: what a cache without
/// invalidation sees (the baseline the cache exists to beat).
struct Blind(mmu_notifier::Subscriptions);

impl AddressSpace for Blind {
    type Watch = ();
    type Error = std::convert::Infallible;
    fn subscriptions(&self) -> &mmu_notifier::SubscriptionsRef {
        &self.0
    }
    fn watch(&self, _: u64, _: u64) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Where the cache learns about changes to the memory.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// userfaultfd, with this flush scope.
    Uffd(FlushScope),
    /// The eBPF start/end feed.
    Feed,
    /// Nothing: a cache without invalidation.
    Blind,
}

/// Runs the workload over this process with invalidations from `source`;
/// returns (reads, bad reads), or `None` where the machine refuses.
fn run(source: Source, reads_per_thread: u64) -> Option<(u64, u64)> {
    if let Err(why) = common::memlock_allows(THREADS * LIVE as u64 * MAX_BUF * 4) {
        skip(why);
        return None;
    }
    let ring = match Ring::new() {
        Ok(r) => r,
        Err(e) => {
            skip(format!("io_uring unavailable: {e} (kernel.io_uring_disabled, seccomp, or a kernel without io_uring)"));
            return None;
        }
    };
    let registrar = ring
        .with(|r| UringRegistrar::new(r, 4096))
        .expect("sparse buffer table");
    let config = Config {
        max_cached: 1024,
        ..Config::default()
    };
    match source {
        Source::Uffd(scope) => {
            let mm = match ProcessMm::with_scope(scope) {
                Ok(mm) => mm,
                Err(e) => {
                    skip(format!("userfaultfd unavailable: {e}"));
                    return None;
                }
            };
            let cache = RegCache::with_config(mm, registrar, config);
            workload(cache, ring, reads_per_thread, &format!("{scope:?}"))
        }
        Source::Feed => {
            let mm = match mmfeed::FeedMm::new() {
                Ok(mm) => mm,
                // As root (CI) the feed must load; elsewhere BPF may be refused.
                Err(e) if !rustix::process::geteuid().is_root() => {
                    skip(format!("the eBPF feed is unavailable: {e}"));
                    return None;
                }
                Err(e) => panic!("FeedMm::new: {e}"),
            };
            let cache = RegCache::with_config(mm, registrar, config);
            workload(cache, ring, reads_per_thread, "eBPF feed")
        }
        Source::Blind => {
            let blind = Blind(mmu_notifier::Subscriptions::new());
            let cache = RegCache::with_config(blind, registrar, config);
            workload(cache, ring, reads_per_thread, "no invalidation")
        }
    }
}

fn workload<S: AddressSpace>(
    cache: RegCache<S, UringRegistrar>,
    ring: Ring,
    reads_per_thread: u64,
    label: &str,
) -> Option<(u64, u64)> {
    let cache = Arc::new(cache);
    // SAFETY: mallopt only tunes the allocator.
    assert_eq!(
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) },
        1
    );
    let (file, data) = pattern_file(&std::env::temp_dir(), FILE_LEN);
    let (file, data, ring) = (Arc::new(file), Arc::new(data), Arc::new(ring));
    let counts = Arc::new(Counts::default());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (cache, file, data, ring, counts) = (
                cache.clone(),
                file.clone(),
                data.clone(),
                ring.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15 ^ (t + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
                let mut bufs: Vec<Buf> = Vec::new();
                let mut done = 0;
                while done < reads_per_thread {
                    let op = xorshift(&mut x) % 16;
                    if bufs.len() < 2 || (op < 2 && bufs.len() < LIVE) {
                        bufs.push(alloc(&mut x));
                        continue;
                    }
                    let i = (xorshift(&mut x) % bufs.len() as u64) as usize;
                    match op {
                        2 => {
                            release(bufs.swap_remove(i));
                            counts.frees.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        3 if matches!(bufs[i].kind, Kind::Malloc) => {
                            let len = P + xorshift(&mut x) % (MAX_BUF - P);
                            // SAFETY: the thread's own malloc'd buffer.
                            let p = unsafe { libc::realloc(bufs[i].addr as *mut _, len as usize) };
                            assert!(!p.is_null(), "realloc");
                            bufs[i] = Buf {
                                addr: p as u64,
                                len,
                                kind: Kind::Malloc,
                            };
                            counts.reallocs.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        3 => {
                            let b = bufs[i];
                            // SAFETY: the thread's own mapping: its pages are
                            // replaced by zero pages, no reference into it.
                            let r = unsafe {
                                libc::madvise(b.addr as *mut _, b.len as usize, libc::MADV_DONTNEED)
                            };
                            assert_eq!(r, 0, "madvise");
                            counts.dontneeds.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        _ => {}
                    }
                    // A read into part of buffer i.
                    let b = bufs[i];
                    let len = (8 + xorshift(&mut x) % b.len) & !7;
                    let len = len.min(b.len & !7).max(8);
                    let off = (xorshift(&mut x) % (FILE_LEN as u64 - len)) & !7;
                    // SAFETY: the thread's own buffer, `len` <= its length.
                    unsafe { libc::memset(b.addr as *mut _, 0xA5, len as usize) };
                    // Every other read runs inside a lock-free hit, with the
                    // buffer index from the hit table's slot; a miss there,
                    // and the other reads, take a guard.
                    let in_hit = (done % 2 == 1)
                        .then(|| {
                            cache.with_hit(b.addr, len, Access::WRITE, |h| {
                                let index = u16::try_from(h.key()).expect("a buffer index");
                                ring.read_fixed(&file, b.addr, len as u32, index, off)
                            })
                        })
                        .and_then(|r| r.ok().flatten());
                    let n = match in_hit {
                        Some(n) => {
                            counts.lock_free.fetch_add(1, Ordering::Relaxed);
                            n
                        }
                        None => {
                            let entry = match cache.get(b.addr, len, Access::WRITE) {
                                Ok(e) => e,
                                Err(e) if e.fall_back() => {
                                    counts.fallbacks.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                Err(e) => panic!("lookup failed: {e}"),
                            };
                            ring.read_fixed(&file, b.addr, len as u32, entry.handle().index(), off)
                        }
                    };
                    assert_eq!(n, len as i32, "READ_FIXED returned {n}");
                    // SAFETY: the thread's own buffer, just read into.
                    let got =
                        unsafe { std::slice::from_raw_parts(b.addr as *const u8, len as usize) };
                    if got != &data[off as usize..(off + len) as usize] {
                        counts.bad.fetch_add(1, Ordering::Relaxed);
                    }
                    counts.reads.fetch_add(1, Ordering::Relaxed);
                    counts.bytes.fetch_add(len, Ordering::Relaxed);
                    done += 1;
                }
                for b in bufs {
                    release(b);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = cache.stats();
    let (reads, bad) = (
        counts.reads.load(Ordering::Relaxed),
        counts.bad.load(Ordering::Relaxed),
    );
    println!(
        "{label}: {reads} READ_FIXED ({} MiB) by {THREADS} threads, {bad} bad; {} frees, {} reallocs, {} DONTNEEDs; \
         cache: {} hits ({} reads inside a lock-free hit), {} misses, {} invalidated, {} raced, {} fallbacks",
        counts.bytes.load(Ordering::Relaxed) >> 20,
        counts.frees.load(Ordering::Relaxed),
        counts.reallocs.load(Ordering::Relaxed),
        counts.dontneeds.load(Ordering::Relaxed),
        s.hits.load(Ordering::Relaxed),
        counts.lock_free.load(Ordering::Relaxed),
        s.misses.load(Ordering::Relaxed),
        s.invalidated.load(Ordering::Relaxed),
        s.retries.load(Ordering::Relaxed),
        counts.fallbacks.load(Ordering::Relaxed),
    );
    assert!(
        counts.lock_free.load(Ordering::Relaxed) > 0,
        "no read ran inside a lock-free hit"
    );
    Some((reads, bad))
}

fn reads_per_thread(default: u64) -> u64 {
    std::env::var("E2E_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The guarantee: with the default (exact) flush scope no read loses data.
#[test]
fn fixed_reads_through_the_cache_never_lose_data() {
    let scope = match std::env::var("E2E_SCOPE").as_deref() {
        Ok("returned") => FlushScope::Returned,
        _ => FlushScope::default(),
    };
    if let Some((reads, bad)) = run(Source::Uffd(scope), reads_per_thread(3000)) {
        assert!(reads >= THREADS * reads_per_thread(3000));
        assert_eq!(
            bad, 0,
            "{bad} of {reads} reads went into stale fixed buffers"
        );
    }
}

/// The same guarantee with the eBPF start/end feed as the source of
/// invalidations (no userfaultfd).
#[test]
fn fixed_reads_through_the_feed_never_lose_data() {
    if let Some((reads, bad)) = run(Source::Feed, reads_per_thread(3000)) {
        assert!(reads >= THREADS * reads_per_thread(3000));
        assert_eq!(
            bad, 0,
            "{bad} of {reads} reads went into stale fixed buffers"
        );
    }
}

/// The data-loss rates the docs quote: the cheap flush scope, and no
/// invalidation at all. `cargo test --release -p uring-registrar --test
/// end_to_end -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: prints the data-loss rates"]
fn data_loss_rates_of_the_cheap_scope_and_of_no_invalidation() {
    let n = reads_per_thread(25_000);
    for source in [Source::Uffd(FlushScope::Returned), Source::Blind] {
        if let Some((reads, bad)) = run(source, n) {
            println!(
                "  -> {:.3}% of reads lost their data",
                bad as f64 * 100.0 / reads as f64
            );
        }
    }
}
