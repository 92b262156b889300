//! The no-std embedding driven from test threads standing in for CPUs: each
//! thread takes a CPU id, its reader was registered by hand at bring-up, and
//! every wait of the subsystem goes through the backend's spin-wait.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;

use mmu_notifier::srcu::Domain;
use mmu_notifier::{
    might_sleep, Again, Callbacks, Error, Event, IntervalNotifier, IntervalOps, MmuNotifier, Range,
    Subscriptions, Warning, PAGE_SIZE,
};
use mmu_notifier_embed::{drive, Cpus, Report, MAX_CPUS};

thread_local! {
    static CPU: Cell<usize> = const { Cell::new(0) };
}

fn current_cpu() -> usize {
    CPU.with(Cell::get)
}

static CPUS: Cpus = Cpus::new(current_cpu);

/// The kernel's one domain, with every CPU brought up.
fn domain() -> &'static Domain {
    static DOMAIN: OnceLock<&'static Domain> = OnceLock::new();
    DOMAIN.get_or_init(|| {
        let d: &'static Domain = Box::leak(Box::new(Domain::with_backend(&CPUS)));
        for id in 0..MAX_CPUS {
            CPUS.bring_up(id, d).unwrap();
        }
        mmu_notifier::debug::set_context_source(&CPUS).unwrap();
        d
    })
}

/// Runs `f` on a new thread that is CPU `id` (ids are never shared by two
/// live threads in these tests).
fn on_cpu<T: Send + 'static>(
    id: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(move || {
        CPU.with(|c| c.set(id));
        f()
    })
}

#[test]
fn a_shadow_mmu_is_driven_through_its_whole_life() {
    let d = domain();
    let report = on_cpu(1, move || drive(d, 8)).join().unwrap().unwrap();
    assert_eq!(
        report,
        Report {
            mapped_after_invalidate: 4,
            zapped: 4,
            released: 1,
            mapped_after_unregister: 0,
            pending_after_barrier: report.pending_after_barrier,
        }
    );
}

#[test]
fn bringing_up_a_cpu_beyond_the_table_is_an_error() {
    assert_eq!(CPUS.bring_up(MAX_CPUS, domain()), Err(MAX_CPUS));
}

/// Counts callbacks, and records one that runs after its unregister
/// returned.
#[derive(Default)]
struct Watched {
    calls: AtomicUsize,
    gone: AtomicBool,
    late: AtomicBool,
}

impl MmuNotifier for Watched {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }
    fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
        if self.gone.load(Ordering::SeqCst) {
            self.late.store(true, Ordering::SeqCst);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn invalidate_range_end(&self, _r: &Range) {
        if self.gone.load(Ordering::SeqCst) {
            self.late.store(true, Ordering::SeqCst);
        }
    }
}

/// Unregister on one CPU against invalidations on two others: once
/// unregister returns, no callback of the notifier runs; the grace periods
/// waited through the backend.
#[test]
fn no_callback_runs_after_unregister_across_cpus() {
    let d = domain();
    let mm = Arc::new(Subscriptions::with_domain(d));
    let stop = Arc::new(AtomicBool::new(false));
    let invalidators: Vec<_> = (2..4)
        .map(|cpu| {
            let (mm, stop) = (mm.clone(), stop.clone());
            on_cpu(cpu, move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = Range::new(0, 16 * PAGE_SIZE, Event::Unmap).unwrap();
                    mm.invalidate_range_start(r).end();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mm2 = mm.clone();
    let registrar = on_cpu(4, move || {
        let mut late = 0;
        for _ in 0..200 {
            let w = Arc::new(Watched::default());
            let h = mm2.register(w.clone()).unwrap();
            while w.calls.load(Ordering::Relaxed) == 0 {
                std::hint::spin_loop();
            }
            mm2.unregister(&h).unwrap();
            w.gone.store(true, Ordering::SeqCst);
            // Give a stale walk every chance to call it.
            for _ in 0..1000 {
                std::hint::spin_loop();
            }
            late += usize::from(w.late.load(Ordering::SeqCst));
        }
        late
    });
    let late = registrar.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let pairs: u64 = invalidators.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(late, 0, "callbacks ran after unregister returned");
    assert!(pairs > 0);
    assert!(CPUS.relaxed() > 0 || pairs > 0);
}

/// Waiting for a grace period from a callback is refused, not a deadlock:
/// the reader the backend hands out knows it is inside a section.
#[test]
fn synchronize_from_a_callback_is_refused() {
    struct Waits {
        domain: &'static Domain,
        refused: AtomicBool,
    }
    impl MmuNotifier for Waits {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            let refused = matches!(self.domain.synchronize(), Err(Error::WouldDeadlock(_)));
            self.refused.store(refused, Ordering::SeqCst);
            Ok(())
        }
    }
    let d = domain();
    on_cpu(5, move || {
        let mm = Arc::new(Subscriptions::with_domain(d));
        let w = Arc::new(Waits {
            domain: d,
            refused: AtomicBool::new(false),
        });
        let h = mm.register(w.clone()).unwrap();
        mm.invalidate_range_start(Range::new(0, PAGE_SIZE, Event::Clear).unwrap())
            .end();
        assert!(w.refused.load(Ordering::SeqCst));
        mm.unregister(&h).unwrap();
    })
    .join()
    .unwrap();
}

/// An interval notifier's read side waits for an invalidation in flight
/// through the backend's spin-wait (no condition variable without std).
#[test]
fn interval_read_begin_waits_through_the_backend() {
    struct Gate {
        inside: AtomicBool,
        open: AtomicBool,
    }
    impl IntervalOps for Gate {
        fn invalidate(&self, sub: &IntervalNotifier, _r: &Range, seq: u64) -> bool {
            sub.set_seq(seq);
            self.inside.store(true, Ordering::SeqCst);
            while !self.open.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            true
        }
    }
    let d = domain();
    let mm = Arc::new(Subscriptions::with_domain(d));
    let gate = Arc::new(Gate {
        inside: AtomicBool::new(false),
        open: AtomicBool::new(false),
    });
    let sub = on_cpu(6, {
        let (mm, gate) = (mm.clone(), gate.clone());
        move || mm.interval_insert(0, PAGE_SIZE, gate).unwrap()
    })
    .join()
    .unwrap();
    let invalidator = on_cpu(7, {
        let mm = mm.clone();
        move || {
            mm.invalidate_range_start(Range::new(0, PAGE_SIZE, Event::Unmap).unwrap())
                .end()
        }
    });
    while !gate.inside.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let before = CPUS.relaxed();
    let reader = on_cpu(8, {
        let sub = sub.clone();
        move || sub.read_begin().unwrap()
    });
    while CPUS.relaxed() == before {
        std::hint::spin_loop();
    }
    gate.open.store(true, Ordering::SeqCst);
    invalidator.join().unwrap();
    let seq = reader.join().unwrap();
    assert!(!sub.read_retry(seq));
    sub.remove().unwrap();
}

/// The debug checks run without std once the embedder says where each CPU's
/// context is: a callback that sleeps in a non-blockable range and one that
/// re-enters its own address space's invalidate path are both reported.
#[test]
fn the_debug_checks_run_on_the_embedders_contexts() {
    #[derive(Default)]
    struct Careless {
        mm: OnceLock<Arc<Subscriptions>>,
        depth: AtomicUsize,
    }
    impl MmuNotifier for Careless {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
            // A lock that sleeps, taken whatever the range allows.
            might_sleep();
            if r.event() == Event::Clear && self.depth.fetch_add(1, Ordering::SeqCst) == 0 {
                let mm = self.mm.get().unwrap();
                mm.invalidate_range_start(Range::new(0, PAGE_SIZE, Event::Unmap).unwrap())
                    .end();
            }
            Ok(())
        }
    }
    let d = domain();
    // The checks exist in debug builds only.
    let expect = u64::from(cfg!(debug_assertions));
    on_cpu(9, move || {
        let mm = Arc::new(Subscriptions::with_domain(d));
        let n = Arc::new(Careless::default());
        n.mm.set(mm.clone()).ok().unwrap();
        let h = mm.register(n.clone()).unwrap();
        let r = |e| Range::new(0, PAGE_SIZE, e).unwrap();
        mm.invalidate_range_start(r(Event::Unmap)).end();
        assert_eq!(mm.diagnostics().count(Warning::SleepInNonBlockable), 0);
        mm.invalidate_range_start_nonblock(r(Event::Unmap))
            .unwrap()
            .end();
        assert_eq!(mm.diagnostics().count(Warning::SleepInNonBlockable), expect);
        assert_eq!(mm.diagnostics().count(Warning::Recursion), 0);
        mm.invalidate_range_start(r(Event::Clear)).end();
        // The nested start and the nested end each re-entered the path.
        assert_eq!(mm.diagnostics().count(Warning::Recursion), 2 * expect);
        mm.unregister(&h).unwrap();
    })
    .join()
    .unwrap();
    // The source is installed once.
    assert!(matches!(
        mmu_notifier::debug::set_context_source(&CPUS),
        Err(Error::ContextSourceSet)
    ));
}
