//! The C side of the registration-cache benchmarks (`c/harness.c`: UCX's
//! rcache, a minimal userfaultfd monitor), compiled with gcc and driven
//! over stdin/stdout so criterion times both sides in one run. Shared by
//! `crates/uffd/benches/uffd.rs` and `crates/mmfeed/benches/feed.rs`
//! (`#[path]`-included).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::BenchmarkId;
use regcache::Access;

const P: u64 = 4096;

/// xorshift64, the generator harness.c uses too.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The index sequence harness.c uses too.
pub fn next_index(x: &mut u64, n: u64) -> u64 {
    // Multiply-shift range reduction, as harness.c: a 64-bit division
    // would cost as much as the lookups being measured, on both sides.
    ((u128::from(xorshift(x)) * u128::from(n)) >> 64) as u64
}

/// Compiles harness.c; `with_ucx` is false when libucx-dev is missing.
pub fn build_harness(target_tmpdir: &str) -> Option<(PathBuf, bool)> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../uffd/benches/c/harness.c");
    let out = PathBuf::from(target_tmpdir).join("uffd-bench-harness");
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
pub struct Harness {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Harness {
    pub fn spawn(exe: &PathBuf, args: &[&str]) -> Harness {
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

    pub fn run(&mut self, iters: u64) -> Duration {
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

/// [`uffd::Populate`] with a device key per registration (as an RDMA
/// memory key), which it gives the cache as its hit key.
#[allow(dead_code)] // used by the feed's benchmark only
#[derive(Default)]
pub struct Keyed {
    next: std::sync::atomic::AtomicU64,
}

impl regcache::Registrar for Keyed {
    type Handle = (uffd::ProcessPin, u64);
    fn register(
        &self,
        start: u64,
        end: u64,
        access: Access,
    ) -> Result<Self::Handle, regcache::RegError> {
        let pin = uffd::Populate.register(start, end, access)?;
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((pin, key))
    }
    fn deregister(&self, _: Self::Handle) -> Result<(), regcache::RegError> {
        Ok(())
    }
    fn hit_key(&self, handle: &Self::Handle) -> u64 {
        handle.1
    }
}

/// Registers the `n` one-page regions mapped at `base` in `cache`, then
/// times hits on them in the order harness.c uses: `get` (a guard), the
/// lock-free `with_hit` reading the handle, and with `key_row` the same
/// reading only the hit key the slot keeps (`{name}_with_hit_key`).
pub fn time_hits<S: regcache::AddressSpace, R: regcache::Registrar>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    cache: &regcache::RegCache<S, R>,
    base: u64,
    n: u64,
    key_row: bool,
) where
    R::Handle: Copy,
{
    for i in 0..n {
        drop(cache.get(base + i * P, P, Access::READ_WRITE).unwrap());
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    time_lookups(g, name.to_string(), base, n, &mut x, |a| {
        std::hint::black_box(cache.get(a, P, Access::READ_WRITE).unwrap());
    });
    // The lock-free hit: the handle used inside the closure, no guard.
    time_lookups(g, format!("{name}_with_hit"), base, n, &mut x, |a| {
        let h = cache.with_hit(a, P, Access::READ_WRITE, |h| *h.handle());
        std::hint::black_box(h.unwrap().unwrap());
    });
    if key_row {
        // The hit decided and answered from the hit table's slot alone.
        time_lookups(g, format!("{name}_with_hit_key"), base, n, &mut x, |a| {
            let k = cache.with_hit(a, P, Access::READ_WRITE, |h| h.key());
            std::hint::black_box(k.unwrap().unwrap());
        });
    }
    assert_eq!(
        cache
            .stats()
            .misses
            .load(std::sync::atomic::Ordering::Relaxed),
        n
    );
}

/// Times `lookup` on the one-page regions at `base`, in the pseudo-random
/// order harness.c uses (`x` is the generator's state), as row `id`.
fn time_lookups(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: String,
    base: u64,
    n: u64,
    x: &mut u64,
    lookup: impl Fn(u64),
) {
    g.bench_with_input(BenchmarkId::new(id, n), &n, |b, &n| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                lookup(base + next_index(x, n) * P);
            }
            t.elapsed()
        })
    });
}
