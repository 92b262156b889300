//! Side-by-side benchmarks (one run, compare as ratios):
//!
//! * `lookup_hit/{ours,ucx}/{1000,100000}`: a registration-cache hit on a
//!   pseudo-random one-page region, `RegCache<ProcessMm>::get` + drop
//!   against UCX's `ucs_rcache_get` + `ucs_rcache_region_put` (Debian's
//!   `libucx-dev`; skipped with a message when missing).
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

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use regcache::Access;
use uffd::{FlushScope, ProcessMm};

// The tests' mapping helpers, so the benchmark maps and unmaps the same way.
#[path = "../tests/common/mod.rs"]
mod common;
use common::{map, unmap, write_word, xorshift, P};

/// The index sequence harness.c uses too.
fn next_index(x: &mut u64, n: u64) -> u64 {
    xorshift(x) % n
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
    assert_eq!(
        cache
            .stats()
            .misses
            .load(std::sync::atomic::Ordering::Relaxed),
        n
    );
    drop(cache);
    mm.shutdown();
    unmap(base, n);
}

fn lookup_hit(c: &mut Criterion) {
    let harness = build_harness();
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

criterion_group!(benches, lookup_hit, munmap_registered, munmap_unregistered);
criterion_main!(benches);
