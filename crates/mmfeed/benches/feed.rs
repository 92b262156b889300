//! The feed against its anchors, one run, reported as ratios:
//!
//! * `lookup_hit/{ours_feed,ours_feed_with_hit,ours_feed_with_hit_key}/{1000,100000}`:
//!   a registration-cache hit on a pseudo-random one-page region with the
//!   feed as the address space (`get` + drop of the guard, the lock-free
//!   `with_hit` reading the handle from the registration, and the same
//!   reading only the device's hit key from the hit table's slot),
//!   against `ours_started_scope_with_hit` (the same hit on userfaultfd's
//!   exact scope) and `ucx` (UCX's `ucs_rcache_get` +
//!   `put`, Debian's `libucx-dev`; skipped with a message when missing).
//! * `feed_tax/{getppid,munmap}_{feed,no_feed}`: a system call the feed
//!   ignores (getppid) and an munmap of a page, with the feed attached and
//!   without: what the feed costs every process on the host, and this one.
//!
//! Needs the feed (root, or CAP_BPF + CAP_PERFMON); the feed rows are
//! skipped with the reason otherwise.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use uffd::{FlushScope, ProcessMm};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{map, raw_munmap, write_tag, P};

#[path = "../../uffd/benches/common/harness.rs"]
mod harness;
use harness::{build_harness, time_hits, Harness, Keyed};

#[path = "../../mmu-notifier/benches/common/estimate.rs"]
mod estimate;

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn cache<S: regcache::AddressSpace>(space: S, n: u64) -> regcache::RegCache<S, Keyed> {
    regcache::RegCache::with_config(
        space,
        Keyed::default(),
        regcache::Config {
            max_cached: n as usize + 16,
            ..regcache::Config::default()
        },
    )
}

/// The feed, or `None` with the reason printed.
fn feed_mm() -> Option<mmfeed::FeedMm> {
    mmfeed::FeedMm::new()
        .map_err(|e| eprintln!("SKIPPED the feed rows: {e}"))
        .ok()
}

fn hits(g: &mut Group<'_>, name: &str, space: impl regcache::AddressSpace, n: u64) {
    let cache = cache(space, n);
    let base = map(n);
    time_hits(g, name, &cache, base, n, true);
    drop(cache);
    raw_munmap(base, n * P);
}

fn lookup_hit(c: &mut Criterion) {
    let harness = build_harness(env!("CARGO_TARGET_TMPDIR"));
    let mut g = c.benchmark_group("lookup_hit");
    for n in [1_000u64, 100_000] {
        if let Some(mm) = feed_mm() {
            hits(&mut g, "ours_feed", mm, n);
        }
        let mm = ProcessMm::with_scope(FlushScope::Started).expect("userfaultfd");
        hits(&mut g, "ours_started_scope", mm.clone(), n);
        mm.shutdown();
        if let Some((exe, true)) = &harness {
            let mut h = Harness::spawn(exe, &["ucx", &n.to_string()]);
            g.bench_with_input(BenchmarkId::new("ucx", n), &n, |b, _| {
                b.iter_custom(|iters| h.run(iters))
            });
        }
    }
    g.finish();
}

/// getppid: a system call the feed does not decode, which every process on
/// the host pays for while the `syscalls` tracepoints are enabled.
fn timed_getppid(iters: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(rustix::process::getppid());
    }
    t.elapsed()
}

/// munmaps of a touched page, timed; `after` runs untimed after each.
fn timed_unmaps(iters: u64, after: impl Fn()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let a = map(1);
        write_tag(a, 1);
        let t = Instant::now();
        raw_munmap(a, P);
        total += t.elapsed();
        after();
    }
    total
}

fn feed_tax(c: &mut Criterion) {
    let mut g = c.benchmark_group("feed_tax");
    g.bench_function("getppid_no_feed", |b| b.iter_custom(timed_getppid));
    g.bench_function("munmap_no_feed", |b| {
        b.iter_custom(|iters| timed_unmaps(iters, || ()))
    });
    if let Some(mm) = feed_mm() {
        g.bench_function("getppid_feed", |b| b.iter_custom(timed_getppid));
        // Each munmap publishes a START and an END; the flush applies them
        // (untimed) so the feed never overruns.
        g.bench_function("munmap_feed", |b| {
            b.iter_custom(|iters| timed_unmaps(iters, || mm.flush().expect("the feed")))
        });
    }
    g.finish();
}

/// A row of the summary: `group/id` in ns.
fn ns(group: &str, id: &str) -> Option<f64> {
    estimate::estimate_ns(env!("CARGO_TARGET_TMPDIR"), group, id)
}

fn summary() {
    println!("\nsummary (same run): registration-cache hit, ns; UCX's time over the feed's");
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "regions", "hit key", "with_hit", "get", "uffd exact", "UCX", "UCX/key", "UCX/hit"
    );
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |u: Option<f64>, h: Option<f64>| match (u, h) {
        (Some(u), Some(h)) => format!("{:.2}x", u / h),
        _ => "-".into(),
    };
    for n in [1_000u64, 100_000] {
        let key = ns("lookup_hit", &format!("ours_feed_with_hit_key/{n}"));
        let hit = ns("lookup_hit", &format!("ours_feed_with_hit/{n}"));
        let get = ns("lookup_hit", &format!("ours_feed/{n}"));
        let exact = ns("lookup_hit", &format!("ours_started_scope_with_hit/{n}"));
        let ucx = ns("lookup_hit", &format!("ucx/{n}"));
        println!(
            "{n:<8} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
            show(key),
            show(hit),
            show(get),
            show(exact),
            show(ucx),
            ratio(ucx, key),
            ratio(ucx, hit)
        );
    }
    println!("the feed's tax (attached over not attached):");
    for call in ["getppid", "munmap"] {
        let with = ns("feed_tax", &format!("{call}_feed"));
        let without = ns("feed_tax", &format!("{call}_no_feed"));
        if let (Some(w), Some(o)) = (with, without) {
            println!(
                "  {call:<8} {o:>8.1} ns -> {w:>8.1} ns ({:+.1} ns, {:.2}x)",
                w - o,
                w / o
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    lookup_hit(&mut c);
    feed_tax(&mut c);
    c.final_summary();
    summary();
}
