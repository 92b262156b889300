//! Side-by-side benchmarks (one run, compare as ratios):
//!
//! * `lookup_hit/{ours,ucx}/{1000,100000}`: a registration-cache hit on a
//!   pseudo-random one-page region, `RegCache<ProcessMm>::get` + drop
//!   against UCX's `ucs_rcache_get` + `ucs_rcache_region_put` (Debian's
//!   `libucx-dev`; skipped with a message when missing).
//! * `lookup_hit/ours_feed/{1000,100000}`: the same hit with the eBPF
//!   start/end feed (`mmfeed::FeedMm`) as the address space: the flush is
//!   one load of the feed (skipped with a message where BPF is refused).
//! * `feed_tax/{getppid,munmap}_{feed,no_feed}`: an unrelated system call
//!   (getppid) and an munmap of an unregistered page with the feed attached
//!   and without: what the feed costs every process on the host, and the
//!   process itself.
//! * `munmap_registered/{ours,c_monitor}`: munmap of a registered page, our
//!   monitor (running the cache's invalidation) against a minimal C monitor
//!   thread that only reads.
//! * `munmap_unregistered/{monitor_running,no_monitor}`: munmap of a page
//!   no watch covers, with a `ProcessMm` alive and without.
//!
//! The C side is `benches/c/harness.c`, compiled here with gcc and timed
//! by its own clock through `iter_custom`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use regcache::Access;
use uffd::{FlushScope, ProcessMm};

// The tests' mapping helpers, so the benchmark maps and unmaps the same way.
#[path = "../tests/common/mod.rs"]
mod common;
use common::{map, unmap, write_word, xorshift, P};

/// The index sequence harness.c uses too.
fn next_index(x: &mut u64, n: u64) -> u64 {
    // Multiply-shift range reduction, as harness.c: a 64-bit division
    // would cost as much as the lookups being measured, on both sides.
    ((u128::from(xorshift(x)) * u128::from(n)) >> 64) as u64
}

/// Compiles harness.c; `with_ucx` is false when libucx-dev is missing.
fn build_harness() -> Option<(PathBuf, bool)> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/c/harness.c");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uffd-bench-harness");
    let ucx = Command::new("pkg-config")
        .args(["--cflags", "--libs", "ucx-ucs"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let mut cc = Command::new("gcc");
    cc.args(["-O2", "-pthread", src, "-o"]).arg(&out);
    match &ucx {
        Some(flags) => {
            cc.args(flags.split_whitespace());
        }
        None => {
            eprintln!(
                "SKIPPED lookup_hit/ucx: UCX is not installed (Debian: apt-get install libucx-dev; pkg-config ucx-ucs)"
            );
            cc.arg("-DNO_UCX");
        }
    }
    match cc.status() {
        Ok(s) if s.success() => Some((out, ucx.is_some())),
        r => {
            eprintln!("SKIPPED C harness: gcc failed ({r:?})");
            None
        }
    }
}

/// A running harness: send an iteration count, read back nanoseconds.
struct Harness {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Harness {
    fn spawn(exe: &PathBuf, args: &[&str]) -> Harness {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn harness");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "harness {args:?} failed to start");
        Harness {
            child,
            stdin,
            stdout,
        }
    }

    fn run(&mut self, iters: u64) -> Duration {
        writeln!(self.stdin, "{iters}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        Duration::from_nanos(line.trim().parse().expect("harness answer"))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hits on `n` cached one-page registrations, with the given flush scope.
fn lookup_hit_ours(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    scope: FlushScope,
    n: u64,
) {
    let mm = ProcessMm::with_scope(scope).expect("userfaultfd");
    let cache = common::cache(&mm, n as usize + 16);
    time_hits(g, name, &cache, n);
    drop(cache);
    mm.shutdown();
}

/// Hits on `n` cached one-page registrations with the eBPF feed as the
/// address space.
fn lookup_hit_feed(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: u64,
) {
    let Some(mm) = feed_mm() else { return };
    let cache = regcache::RegCache::with_config(
        mm,
        uffd::Populate,
        regcache::Config {
            max_cached: n as usize + 16,
            ..regcache::Config::default()
        },
    );
    time_hits(g, "ours_feed", &cache, n);
}

/// The feed, or `None` with the reason printed.
fn feed_mm() -> Option<mmfeed::FeedMm> {
    mmfeed::FeedMm::new()
        .map_err(|e| eprintln!("SKIPPED the feed rows: {e}"))
        .ok()
}

/// Registers `n` one-page regions in `cache`, then times hits on them in
/// the order harness.c uses.
fn time_hits<S: regcache::AddressSpace>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    cache: &regcache::RegCache<S, uffd::Populate>,
    n: u64,
) {
    let base = map(n);
    for i in 0..n {
        drop(cache.get(base + i * P, P, Access::READ_WRITE).unwrap());
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let a = base + next_index(&mut x, n) * P;
                std::hint::black_box(cache.get(a, P, Access::READ_WRITE).unwrap());
            }
            t.elapsed()
        })
    });
    // The lock-free hit: the handle used inside the closure, no guard.
    g.bench_with_input(
        BenchmarkId::new(format!("{name}_with_hit"), n),
        &n,
        |b, &n| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    let a = base + next_index(&mut x, n) * P;
                    let h = cache.with_hit(a, P, Access::READ_WRITE, |h| *h.handle());
                    std::hint::black_box(h.unwrap().unwrap());
                }
                t.elapsed()
            })
        },
    );
    assert_eq!(
        cache
            .stats()
            .misses
            .load(std::sync::atomic::Ordering::Relaxed),
        n
    );
    unmap(base, n);
}

fn lookup_hit(c: &mut Criterion) {
    let harness = build_harness();
    let mut g = c.benchmark_group("lookup_hit");
    for n in [1_000u64, 100_000] {
        lookup_hit_ours(&mut g, "ours", FlushScope::Returned, n);
        lookup_hit_ours(&mut g, "ours_started_scope", FlushScope::Started, n);
        lookup_hit_feed(&mut g, n);
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
    let harness = build_harness();
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

/// getppid: a system call the feed does not decode, which every process on
/// the host pays for while the `syscalls` tracepoints are enabled.
fn timed_getppid(iters: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(rustix::process::getppid());
    }
    t.elapsed()
}

fn feed_tax(c: &mut Criterion) {
    let mut g = c.benchmark_group("feed_tax");
    g.bench_function("getppid_no_feed", |b| b.iter_custom(timed_getppid));
    g.bench_function("munmap_no_feed", |b| b.iter_custom(timed_unmaps));
    if let Some(mm) = feed_mm() {
        g.bench_function("getppid_feed", |b| b.iter_custom(timed_getppid));
        // Each munmap publishes a START and an END; the flush applies them
        // (outside the timed part) so the feed never overruns.
        g.bench_function("munmap_feed", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let a = map(1);
                    write_word(a, 1);
                    let t = Instant::now();
                    unmap(a, 1);
                    total += t.elapsed();
                    mm.flush().expect("the feed");
                }
                total
            })
        });
    }
    g.finish();
}

#[path = "../../mmu-notifier/benches/common/estimate.rs"]
mod estimate;

/// A row of the summary: `group/id` in ns.
fn ns(group: &str, id: &str) -> Option<f64> {
    estimate::estimate_ns(env!("CARGO_TARGET_TMPDIR"), group, id)
}

fn summary() {
    println!("\nsummary (same run): exact registration-cache hit (with_hit on the feed), ns and UCX's time over ours");
    println!(
        "{:<8} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "regions", "feed", "uffd exact", "UCX", "UCX/feed", "uffd/feed"
    );
    for n in [1_000u64, 100_000] {
        let feed = ns("lookup_hit", &format!("ours_feed_with_hit/{n}"));
        let exact = ns("lookup_hit", &format!("ours_started_scope_with_hit/{n}"));
        let ucx = ns("lookup_hit", &format!("ucx/{n}"));
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "{n:<8} {:>10} {:>12} {:>10} {:>10} {:>12}",
            show(feed),
            show(exact),
            show(ucx),
            ratio(ucx, feed),
            ratio(exact, feed)
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
    munmap_registered(&mut c);
    munmap_unregistered(&mut c);
    feed_tax(&mut c);
    c.final_summary();
    summary();
}
