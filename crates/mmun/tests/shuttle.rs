//! Whole-system schedules: the software MMU with all four reference mirrors
//! and the coherence oracle on, driven by several threads of primary
//! operations and secondary faults, under shuttle's randomised schedulers.
//!
//! Built only with `--cfg shuttle`, which switches mmu-notifier's sync facade
//! (and so every lock, atomic and thread-local of softmm and the mirrors) to
//! shuttle's: every acquisition and atomic access is a point where the
//! scheduler may switch threads, so one execution explores an interleaving a
//! real machine produces rarely. Each execution draws its workload seed from
//! shuttle's own random source, so the printed failing schedule reproduces
//! the operations as well as their interleaving.
//!
//! ```text
//! RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle \
//!   cargo test --release -p mmun --test shuttle
//! ```
//!
//! Knobs (environment): `MMUN_SHUTTLE_ITERATIONS` (executions per scheduler,
//! default 2000), `SHUTTLE_RANDOM_SEED` (shuttle's seed for the random
//! scheduler), `MMUN_SHUTTLE_REPLAY` (a schedule printed by a failure: runs
//! exactly that execution).
#![cfg(shuttle)]

use std::sync::Arc;

use mmun::rng::Rng;
use mmun::stress::{self, Fail, Kind};
use mmun::trace::Monitor;
use mmun::world;
use shuttle::rand::Rng as _;
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::{Config, FailurePersistence, MaxSteps, Runner};
use softmm::PhysMem;

/// Worker threads besides the test's own (which also runs operations).
const WORKERS: usize = 3;
/// Operations per thread and execution.
const OPS: usize = 6;

fn iterations() -> usize {
    std::env::var("MMUN_SHUTTLE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn config() -> Config {
    let mut c = Config::new();
    c.failure_persistence = FailurePersistence::Print;
    // A livelock (a retry loop that never sees its collision end) fails the
    // execution instead of hanging the test.
    c.max_steps = MaxSteps::FailAfter(2_000_000);
    c.silence_warnings = true;
    c
}

/// Runs `OPS` operations drawn from `seed` on one of the spaces; panics with
/// the operation's name on a coherence violation.
fn worker(spaces: &[world::Space], seed: u64, skip: &[Kind]) {
    let mut rng = Rng::new(seed);
    for _ in 0..OPS {
        let kind = stress::pick(&mut rng, false, skip);
        let sp = &spaces[rng.below(spaces.len() as u64) as usize];
        if let Err(Fail::Violation(msg)) = stress::exec(kind, sp, &mut rng) {
            panic!("coherence violation in {}: {msg}", kind.name());
        }
    }
}

/// One execution: two address spaces (every mirror attached to each), the
/// test thread plus `WORKERS` threads issuing the stress mix (aimed at the
/// first `hot` pages of each region if set), then teardown.
/// Fails on any oracle violation, violation reported by a mirror, leaked
/// frame or swap slot, or double free.
fn whole_system(skip: &[Kind], hot: Option<u64>) {
    let seed: u64 = shuttle::rand::thread_rng().gen();
    let phys = PhysMem::new(1024);
    let monitor = Arc::new(Monitor::default());
    let spaces: Arc<Vec<world::Space>> = Arc::new(
        (0..2)
            .map(|i| world::Space {
                hot,
                ..world::space(&phys, &monitor, i, true)
            })
            .collect(),
    );
    let handles: Vec<_> = (0..WORKERS as u64)
        .map(|t| {
            let (spaces, skip) = (spaces.clone(), skip.to_vec());
            shuttle::thread::spawn(move || worker(&spaces, seed ^ ((t + 1) << 32), &skip))
        })
        .collect();
    worker(&spaces, seed, skip);
    for h in handles {
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    }
    let violations = phys.oracle().violations();
    assert!(
        violations.is_empty(),
        "workload seed {seed:#x}: oracle violations: {}",
        violations
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(Arc::into_inner(spaces).expect("workers joined"));
    let leaks = stress::leaks_after_teardown(&phys);
    assert!(leaks.is_empty(), "workload seed {seed:#x}: {leaks:?}");
}

/// Which schedules to explore.
#[derive(Clone, Copy)]
enum Sched {
    /// Uniformly random choice at every switch point.
    Random,
    /// PCT with three priority change points: few preemptions at
    /// adversarial points, good at ordering bugs that need one thread to stop
    /// inside a short window.
    Pct,
}

fn run(skip: Vec<Kind>, hot: Option<u64>, sched: Sched) {
    let f = move || whole_system(&skip, hot);
    if let Ok(schedule) = std::env::var("MMUN_SHUTTLE_REPLAY") {
        shuttle::replay(f, &schedule);
        return;
    }
    match sched {
        Sched::Pct => Runner::new(PctScheduler::new(3, iterations()), config()).run(f),
        Sched::Random => Runner::new(RandomScheduler::new(iterations()), config()).run(f),
    };
}

/// Every kind of the stress mix except `only`.
fn all_but(only: &[Kind]) -> Vec<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .filter(|k| !only.contains(k))
        .collect()
}

#[test]
fn whole_system_random_schedules() {
    run(Vec::new(), None, Sched::Random);
}

#[test]
fn whole_system_pct_schedules() {
    run(Vec::new(), None, Sched::Pct);
}

/// Only the secondaries' faults against the operations that tear mappings
/// down, on two pages per region, so most switch points fall inside some
/// fault..retry window of a page that is being invalidated.
#[test]
fn secondary_faults_against_unmaps_on_hot_pages() {
    run_against_faults(
        &[
            Kind::Remap,
            Kind::Mremap,
            Kind::DontNeed,
            Kind::Free,
            Kind::Migrate,
            Kind::SwapOut,
        ],
        2,
    );
}

/// Transparent huge pages faulted in, split (partial unmap, madvise,
/// mprotect, reclaim, device migration), remapped and collapsed, against
/// the secondaries' faults, on the first pages of each region (the THP
/// region's first block).
#[test]
fn thp_splits_and_collapses_against_secondary_faults() {
    run_against_faults(
        &[
            Kind::HugeRemap,
            Kind::HugeAdvice,
            Kind::Collapse,
            Kind::DontNeed,
            Kind::Mprotect,
            Kind::SwapOut,
        ],
        4,
    );
}

/// The CPU's writes and the secondaries' faults and accesses, which the
/// targeted schedules race against the operations under test.
const FAULTS: [Kind; 7] = [
    Kind::CpuWrite,
    Kind::KvmFault,
    Kind::DevRead,
    Kind::DevWrite,
    Kind::DevMigrate,
    Kind::TlbAccess,
    Kind::RegLookup,
];

/// Only `ops` and [`FAULTS`], on the first `hot` pages of each region,
/// under both schedulers.
fn run_against_faults(ops: &[Kind], hot: u64) {
    let skip = all_but(&[ops, &FAULTS[..]].concat());
    run(skip.clone(), Some(hot), Sched::Random);
    run(skip, Some(hot), Sched::Pct);
}

/// Notifiers and interval notifiers registered and unregistered, and
/// address spaces exiting under a secondary, while invalidations run.
#[test]
fn registration_and_exit_against_invalidations() {
    let skip = all_but(&[
        Kind::Attach,
        Kind::ChildMirror,
        Kind::Remap,
        Kind::DontNeed,
        Kind::CpuWrite,
        Kind::Migrate,
        Kind::KvmFault,
        Kind::RegLookup,
    ]);
    run(skip, Some(4), Sched::Random);
}

/// A failing schedule is only useful if replaying it reproduces the run:
/// nothing in softmm or the mirrors may depend on randomness or timing that
/// shuttle does not control (std's randomly seeded hash maps, clocks, OS
/// threads). shuttle runs each execution twice and compares the schedules.
#[test]
fn executions_replay_deterministically() {
    shuttle::check_uncontrolled_nondeterminism(|| whole_system(&[], Some(4)), 50);
}
