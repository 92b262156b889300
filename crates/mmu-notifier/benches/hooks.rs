//! Cost of the primary-MMU hooks, with every baseline in the same run:
//! a loop calling nothing, the SRCU read pair alone, start+end with 0, 1 and 8
//! trivial notifiers (on a range the caller keeps, `invalidate_range_start_in`,
//! Linux's shape, and on a range handed over by value), the naive design (a `Mutex<Vec<Arc<dyn ...>>>` walk
//! for start and again for end), and the anchor: Linux v6.6's own walk
//! re-created in C (`benches/c/linux_walk.c`: the `mm_has_notifiers` test,
//! one read-side section per walk with liburcu's membarrier flavour, an RCU
//! list walk with one indirect call per notifier), built here with gcc and
//! Debian's `liburcu-dev` (skipped with a message when missing). The summary
//! at the end gives ours / C.
//!
//! `cargo bench -p mmu-notifier --bench hooks`

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::Criterion;
use mmu_notifier::{srcu, Again, Callbacks, Event, MmuNotifier, Range, Subscriptions};

/// A trivial notifier: start and end do nothing observable. Their bodies
/// are a compiler barrier, the equivalent of the C anchor's
/// `asm volatile("" : : "r"(sub), "r"(range) : "memory")` (its operands are
/// already in registers; `black_box` would add a store to the stack).
struct Trivial;
impl MmuNotifier for Trivial {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }
    fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }
    fn invalidate_range_end(&self, _r: &Range) {
        compiler_fence(Ordering::SeqCst);
    }
}

/// Compiles the C anchor; `None` (with the reason printed) without gcc or
/// liburcu.
fn build_anchor() -> Option<PathBuf> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/c/linux_walk.c");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hooks-linux-walk");
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "liburcu-memb"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(flags) = flags else {
        eprintln!("SKIPPED hooks/c_linux_*: liburcu is not installed (Debian: apt-get install liburcu-dev)");
        return None;
    };
    let flags = String::from_utf8_lossy(&flags.stdout).into_owned();
    let ok = Command::new("gcc")
        .args(["-O2", src, "-o"])
        .arg(&out)
        .args(flags.split_whitespace())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED hooks/c_linux_*: gcc could not build {src}");
        return None;
    }
    Some(out)
}

/// The C anchor for `n` notifiers, running in its own process: it reads an
/// iteration count and answers the nanoseconds they took.
struct Anchor {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Anchor {
    fn spawn(exe: &Path, n: usize) -> Anchor {
        let mut child = Command::new(exe)
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the C anchor");
        let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        let mut a = Anchor {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        assert_eq!(a.answer(), "ready");
        a
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("anchor output");
        line.trim().to_string()
    }

    fn run(&mut self, iters: u64) -> Duration {
        writeln!(self.stdin, "{iters}").expect("anchor input");
        Duration::from_nanos(self.answer().parse().expect("anchor answer"))
    }
}

impl Drop for Anchor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const COUNTS: [usize; 3] = [0, 1, 8];

fn hooks(c: &mut Criterion, anchor: Option<&Path>) {
    let range = Range::new(0x1000, 0x2000, Event::Clear).unwrap();
    let mut g = c.benchmark_group("hooks");

    g.bench_function("baseline_nothing", |b| {
        b.iter(|| black_box(black_box(&range).start()))
    });

    // The guard is not passed through `black_box`: that would add a stack
    // round trip the real read side does not have. The atomic store of the
    // lock and of the unlock cannot be optimised away.
    g.bench_function("srcu_read_pair", |b| b.iter(|| drop(srcu::read_lock())));

    for n in COUNTS {
        if let Some(exe) = anchor {
            let mut a = Anchor::spawn(exe, n);
            g.bench_function(format!("c_linux_{n}_notifiers"), |b| {
                b.iter_custom(|iters| a.run(iters))
            });
        }
        let mm = Subscriptions::new();
        let handles: Vec<_> = (0..n)
            .map(|_| mm.register(Arc::new(Trivial)).unwrap())
            .collect();
        g.bench_function(format!("start_end_{n}_notifiers"), |b| {
            b.iter(|| mm.invalidate_range_start(black_box(range)).end())
        });
        // Linux's shape: the caller keeps the range, the guard borrows it.
        g.bench_function(format!("start_end_in_{n}_notifiers"), |b| {
            b.iter(|| {
                let mut r = black_box(range);
                mm.invalidate_range_start_in(&mut r).end()
            })
        });
        for h in &handles {
            mm.unregister(h).unwrap();
        }

        let naive: Mutex<Vec<Arc<dyn MmuNotifier>>> = Mutex::new(
            (0..n)
                .map(|_| Arc::new(Trivial) as Arc<dyn MmuNotifier>)
                .collect(),
        );
        g.bench_function(format!("naive_mutex_vec_{n}_notifiers"), |b| {
            b.iter(|| {
                let r = black_box(range);
                for s in naive.lock().unwrap().iter() {
                    let _ = s.invalidate_range_start(&r);
                }
                for s in naive.lock().unwrap().iter() {
                    s.invalidate_range_end(&r);
                }
            })
        });
    }
    g.finish();
}

#[path = "common/estimate.rs"]
mod estimate;

/// The time per iteration criterion reports for `hooks/<id>`, in ns.
fn estimate_ns(id: &str) -> Option<f64> {
    estimate::estimate_ns(env!("CARGO_TARGET_TMPDIR"), "hooks", id)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let anchor = build_anchor();
    hooks(&mut c, anchor.as_deref());
    c.final_summary();
    println!("\nsummary: start+end pair, ours against Linux's walk in C (same run)");
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "notifiers", "ours (in)", "ours (value)", "C", "in/C", "value/C"
    );
    for n in COUNTS {
        let borrowed = estimate_ns(&format!("start_end_in_{n}_notifiers"));
        let by_value = estimate_ns(&format!("start_end_{n}_notifiers"));
        let linux = estimate_ns(&format!("c_linux_{n}_notifiers"));
        if let (Some(i), Some(v), Some(l)) = (borrowed, by_value, linux) {
            println!(
                "{n:<10} {:>10.2}ns {:>10.2}ns {:>8.2}ns {:>9.2}x {:>9.2}x",
                i,
                v,
                l,
                i / l,
                v / l
            );
        }
    }
}
