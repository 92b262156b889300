//! Side-by-side benchmarks (one run, compare as ratios):
//!
//! * `lookup_hit/{ours,ucx}/{1000,100000}`: a registration-cache hit on a
//!   pseudo-random one-page region, `RegCache<ProcessMm>::get` + drop
//!   against UCX's `ucs_rcache_get` + `ucs_rcache_region_put` (Debian's
//!   `libucx-dev`; skipped with a message when missing).
//!   `*_with_hit` rows time the lock-free `RegCache::with_hit` instead.
//!   The same hit on the eBPF feed is in `crates/mmfeed/benches/feed.rs`.
//! * `munmap_registered/{ours,c_monitor}`: munmap of a registered page, our
//!   monitor (running the cache's invalidation) against a minimal C monitor
//!   thread that only reads.
//! * `munmap_unregistered/{monitor_running,no_monitor}`: munmap of a page
//!   no watch covers, with a `ProcessMm` alive and without.
//!
//! The C side is `benches/c/harness.c`, compiled here with gcc and timed
//! by its own clock through `iter_custom`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use regcache::Access;
use uffd::{FlushScope, ProcessMm};

// The tests' mapping helpers, so the benchmark maps and unmaps the same way.
#[path = "../tests/common/mod.rs"]
mod common;
use common::{map, unmap, write_word, P};

#[path = "common/harness.rs"]
mod harness;
use harness::{build_harness, time_hits, Harness};

/// Hits on `n` cached one-page registrations, with the given flush scope.
fn lookup_hit_ours(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    scope: FlushScope,
    n: u64,
) {
    let mm = ProcessMm::with_scope(scope).expect("userfaultfd");
    let cache = common::cache(&mm, n as usize + 16);
    let base = map(n);
    time_hits(g, name, &cache, base, n, false);
    unmap(base, n);
    drop(cache);
    mm.shutdown();
}

fn lookup_hit(c: &mut Criterion) {
    let harness = build_harness(env!("CARGO_TARGET_TMPDIR"));
    let mut g = c.benchmark_group("lookup_hit");
    for n in [1_000u64, 100_000] {
        lookup_hit_ours(&mut g, "ours", FlushScope::Returned, n);
        lookup_hit_ours(&mut g, "ours_started_scope", FlushScope::Started, n);
        if let Some((exe, true)) = &harness {
            let n_arg = n.to_string();
            let mut h = Harness::spawn(exe, &["ucx", &n_arg]);
            g.bench_with_input(BenchmarkId::new("ucx", n), &n, |b, _| {
                b.iter_custom(|iters| h.run(iters))
            });
        }
    }
    g.finish();
}

fn munmap_registered(c: &mut Criterion) {
    let harness = build_harness(env!("CARGO_TARGET_TMPDIR"));
    let mut g = c.benchmark_group("munmap_registered");
    {
        let mm = ProcessMm::new().expect("userfaultfd");
        let cache = common::cache(&mm, 1024);
        g.bench_function("ours", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let a = map(1);
                    write_word(a, 1);
                    drop(cache.get(a, P, Access::READ_WRITE).unwrap());
                    let t = Instant::now();
                    unmap(a, 1);
                    total += t.elapsed();
                }
                total
            })
        });
        drop(cache);
        mm.shutdown();
    }
    if let Some((exe, _)) = &harness {
        let mut h = Harness::spawn(exe, &["monitor"]);
        g.bench_function("c_monitor", |b| b.iter_custom(|iters| h.run(iters)));
    }
    g.finish();
}

fn timed_unmaps(iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let a = map(1);
        write_word(a, 1);
        let t = Instant::now();
        unmap(a, 1);
        total += t.elapsed();
    }
    total
}

fn munmap_unregistered(c: &mut Criterion) {
    let mut g = c.benchmark_group("munmap_unregistered");
    {
        let mm = ProcessMm::new().expect("userfaultfd");
        // Something is watched, elsewhere.
        let other = map(4);
        let w = mm.watch(other, 4 * P).unwrap();
        g.bench_function("monitor_running", |b| b.iter_custom(timed_unmaps));
        drop(w);
        mm.shutdown();
        unmap(other, 4);
    }
    g.bench_function("no_monitor", |b| b.iter_custom(timed_unmaps));
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    lookup_hit(&mut c);
    munmap_registered(&mut c);
    munmap_unregistered(&mut c);
    c.final_summary();
}
