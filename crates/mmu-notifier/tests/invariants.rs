//! The core's invariants (every registered notifier sees every start and
//! its end; release once; no callback after unregister) and the places we
//! deliberately do better than Linux.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use mmu_notifier::{
    srcu, Again, Callbacks, MmuNotifier, NotifierAlloc, NotifierHandle, Range, Subscriptions,
    SubscriptionsRef,
};

/// Registers a recorder named `name` from another thread (this one is inside
/// a pair's read-side section, where registering is refused: it would
/// deadlock in Linux) and returns it.
fn register_elsewhere(mm: &Subscriptions, name: &'static str, log: &Log) -> Arc<Recorder> {
    let late = Recorder::new(name, START_END, log);
    let (mm2, late2) = (mm.handle(), late.clone());
    std::thread::spawn(move || mm2.register(late2).unwrap())
        .join()
        .unwrap();
    late
}

/// An address space with one recorder `a` on it.
fn one_recorder() -> (Subscriptions, Log, Arc<Recorder>, NotifierHandle) {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", START_END, &log);
    let h = mm.register(a.clone()).unwrap();
    (mm, log, a, h)
}

/// No split pair: a notifier registered between a start and its end gets
/// neither (never an end without its start), and sees the next pair whole.
#[test]
fn registration_never_splits_a_start_end_pair() {
    let mm = Subscriptions::new();
    let log = new_log();
    let old = Recorder::new("old", START_END, &log);
    mm.register(old.clone()).unwrap();
    let inv = mm.invalidate_range_start(range(0, 0x1000));
    let late = register_elsewhere(&mm, "late", &log);
    inv.end();
    assert!(
        late.calls().is_empty(),
        "got an end without its start: {:?}",
        late.calls()
    );
    assert_eq!(old.calls().len(), 2);
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert_eq!(late.calls().len(), 2);
}

/// The same with the very first registration on the address space (the
/// has_notifiers fast path switches on in the middle of the pair).
#[test]
fn first_registration_mid_pair_gets_no_end() {
    let mm = Subscriptions::new();
    let log = new_log();
    let inv = mm.invalidate_range_start(range(0, 0x1000));
    let late = Recorder::new("late", START_END, &log);
    mm.register(late.clone()).unwrap();
    inv.end();
    assert!(late.calls().is_empty());
}

/// Better than Linux: a notifier unregistered between a start and its end
/// still gets the end. The pair holds its read-side section from start to
/// end, so unregister (which waits for a grace period) returns only after
/// the end ran; Linux's unregister returns at once and the notifier never
/// sees the end of a pair whose start it saw.
#[test]
fn unregister_mid_pair_waits_for_the_end() {
    let (mm, _log, a, h) = one_recorder();
    let inv = mm.invalidate_range_start(range(0, 0x1000));
    let (tx, rx) = std::sync::mpsc::channel();
    let mm2 = mm.clone();
    let t = std::thread::spawn(move || {
        mm2.unregister(&h).unwrap();
        tx.send(()).unwrap();
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(100))
            .is_err(),
        "unregister returned while a pair that started with the notifier was running"
    );
    inv.end();
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("unregister returns once the pair ended");
    t.join().unwrap();
    assert_eq!(a.calls().len(), 2, "start and end: {:?}", a.calls());
}

/// List order: newest registered first, for every hook.
#[test]
fn callbacks_run_newest_first() {
    let mm = Subscriptions::new();
    let log = new_log();
    let names = ["n0", "n1", "n2", "n3"];
    for n in names {
        mm.register(Recorder::new(n, START_END, &log)).unwrap();
    }
    mm.invalidate_range_start(range(0, 0x1000)).end();
    let order: Vec<_> = log.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(order, ["n3", "n2", "n1", "n0", "n3", "n2", "n1", "n0"]);
}

/// Invariant 2: after unregister returns no callback runs, even with
/// invalidations hammering from other threads; release ran exactly once.
#[test]
fn no_callback_after_unregister_returns() {
    for _ in 0..50 {
        let mm = Arc::new(Subscriptions::new());
        let log = new_log();
        let a = Recorder::new(
            "a",
            START_END | Callbacks::RELEASE | Callbacks::CLEAR_YOUNG,
            &log,
        );
        let h = mm.register(a.clone()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let (mm, stop) = (mm.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if i == 0 {
                            mm.invalidate_range_start(range(0, 0x1000)).end();
                        } else {
                            mm.clear_young(0, 0x1000);
                        }
                    }
                })
            })
            .collect();
        thread::yield_now();
        mm.unregister(&h).unwrap();
        a.dead.store(true, Ordering::SeqCst);
        for _ in 0..100 {
            mm.invalidate_range_start(range(0, 0x1000)).end();
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(a.calls_after_dead.load(Ordering::SeqCst), 0);
        assert_eq!(a.releases.load(Ordering::SeqCst), 1);
    }
}

/// Exit order: every release runs (newest first) before exit returns, and
/// afterwards the list notifiers see nothing more.
#[test]
fn exit_releases_all_then_nothing() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", START_END | Callbacks::RELEASE, &log);
    let b = Recorder::new("b", START_END | Callbacks::RELEASE, &log);
    mm.register(a.clone()).unwrap();
    mm.register(b.clone()).unwrap();
    mm.release().unwrap();
    assert!(!mm.is_live());
    mm.invalidate_range_start(Range::everything(mmu_notifier::Event::Unmap))
        .end();
    let l: Vec<_> = log.lock().unwrap().clone();
    assert_eq!(l, [("b", Call::Release), ("a", Call::Release)]);
    assert!(mm.has_notifiers(), "has_notifiers is never reset (Linux)");
}

/// put from inside release (allowed in Linux) defers the free to after the
/// exit's grace period.
#[test]
fn put_from_release_is_deferred_and_runs() {
    struct PutsItself {
        mm: SubscriptionsRef,
        handle: std::sync::OnceLock<mmu_notifier::NotifierHandle>,
    }
    impl MmuNotifier for PutsItself {
        fn callbacks(&self) -> Callbacks {
            Callbacks::RELEASE
        }
        fn release(&self) {
            self.mm.put(self.handle.get().unwrap()).unwrap();
        }
    }
    struct Ops {
        freed: AtomicUsize,
        made: std::sync::Mutex<Option<Arc<PutsItself>>>,
    }
    impl NotifierAlloc for Ops {
        fn alloc_notifier(
            &self,
            mm: &SubscriptionsRef,
        ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
            let n = Arc::new(PutsItself {
                mm: mm.clone(),
                handle: Default::default(),
            });
            *self.made.lock().unwrap() = Some(n.clone());
            Ok(n)
        }
        fn free_notifier(&self, _n: Arc<dyn MmuNotifier>) {
            assert!(
                !srcu::in_read_section(),
                "free runs outside any read section"
            );
            self.freed.fetch_add(1, Ordering::SeqCst);
        }
    }
    let mm = Subscriptions::new();
    let ops = Arc::new(Ops {
        freed: AtomicUsize::new(0),
        made: Default::default(),
    });
    let dyn_ops: Arc<dyn NotifierAlloc> = ops.clone();
    let h = mm.get(&dyn_ops).unwrap();
    ops.made
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .handle
        .set(h)
        .unwrap();
    mm.release().unwrap();
    mmu_notifier::synchronize().unwrap();
    assert_eq!(ops.freed.load(Ordering::SeqCst), 1);
}

/// A put racing an in-flight invalidation: the free waits until the callback
/// that was running has returned.
#[test]
fn put_racing_invalidation_frees_after_grace_period() {
    struct Busy {
        inside: Arc<AtomicBool>,
        go: Arc<Barrier>,
        freed_while_inside: Arc<AtomicBool>,
        freed: Arc<AtomicBool>,
    }
    impl MmuNotifier for Busy {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            self.inside.store(true, Ordering::SeqCst);
            self.go.wait();
            thread::sleep(std::time::Duration::from_millis(20));
            self.inside.store(false, Ordering::SeqCst);
            Ok(())
        }
    }
    struct Ops(Arc<Busy>);
    impl NotifierAlloc for Ops {
        fn alloc_notifier(
            &self,
            _mm: &SubscriptionsRef,
        ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
            Ok(self.0.clone())
        }
        fn free_notifier(&self, _n: Arc<dyn MmuNotifier>) {
            if self.0.inside.load(Ordering::SeqCst) {
                self.0.freed_while_inside.store(true, Ordering::SeqCst);
            }
            self.0.freed.store(true, Ordering::SeqCst);
        }
    }
    let busy = Arc::new(Busy {
        inside: Arc::new(AtomicBool::new(false)),
        go: Arc::new(Barrier::new(2)),
        freed_while_inside: Arc::new(AtomicBool::new(false)),
        freed: Arc::new(AtomicBool::new(false)),
    });
    let ops: Arc<dyn NotifierAlloc> = Arc::new(Ops(busy.clone()));
    let mm = Arc::new(Subscriptions::new());
    let h = mm.get(&ops).unwrap();
    let mm2 = mm.clone();
    let t = thread::spawn(move || mm2.invalidate_range_start(range(0, 0x1000)).end());
    busy.go.wait();
    mm.put(&h).unwrap();
    mmu_notifier::synchronize().unwrap();
    t.join().unwrap();
    assert!(!busy.freed_while_inside.load(Ordering::SeqCst));
    assert!(
        busy.freed.load(Ordering::SeqCst),
        "synchronize returned before the free it must wait for"
    );
}

/// `synchronize` is a barrier: it waits for deferred work queued before it,
/// even if another thread is the one running it.
#[test]
fn synchronize_waits_for_deferred_work_queued_before_it() {
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let ran = ran.clone();
        srcu::call(move || {
            thread::sleep(std::time::Duration::from_millis(1));
            ran.fetch_add(1, Ordering::SeqCst);
        });
    }
    let helper = thread::spawn(|| srcu::synchronize().unwrap());
    mmu_notifier::synchronize().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 10);
    helper.join().unwrap();
}

/// The hooks are cheap no-ops when nobody ever subscribed.
#[test]
fn hooks_without_notifiers_do_nothing() {
    let mm = Subscriptions::new();
    assert!(!mm.has_notifiers());
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert!(mm.invalidate_range_start_nonblock(range(0, 0x1000)).is_ok());
    assert!(!mm.clear_flush_young(0, 0x1000));
    assert!(!mm.test_young(0));
    mm.change_pte(
        0,
        mmu_notifier::PteValue {
            pfn: 1,
            writable: false,
        },
    );
    mm.arch_invalidate_secondary_tlbs(0, u64::MAX);
    assert_eq!(mm.diagnostics().total(), 0);
}

// ---------------------------------------------------------------------------
// Gaps found by cargo-mutants (each test fails on the mutant it names).
// ---------------------------------------------------------------------------

/// A thread's cached notifier lists are per address space: two address
/// spaces whose lists have the same version never share one
/// (`CacheSlot::get` comparing the key).
#[test]
fn cached_lists_are_per_address_space() {
    let (m1, m2) = (Subscriptions::new(), Subscriptions::new());
    let log = new_log();
    let a = Recorder::new("a", START_END, &log);
    let b = Recorder::new("b", START_END, &log);
    m1.register(a).unwrap();
    m2.register(b).unwrap(); // both lists are at the same version now
    m1.invalidate_range_start(range(0, 0x1000)).end(); // caches m1's list
    m2.invalidate_range_start(range(0, 0x1000)).end();
    let names: Vec<&str> = log.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["a", "a", "b", "b"]);
}

/// Ids are unique per address space; a handle says it is registered until
/// unregister.
#[test]
fn ids_are_unique_and_handles_know_they_are_registered() {
    let (m1, m2) = (Subscriptions::new(), Subscriptions::new());
    assert_ne!(m1.id(), m2.id());
    assert_eq!(m1.id(), m1.clone().id());
    let h = m1
        .register(Recorder::new("a", START_END, &new_log()))
        .unwrap();
    assert!(h.is_registered());
    m1.unregister(&h).unwrap();
    assert!(!h.is_registered());
}

/// A start failure in a *blockable* range (a notifier bug, reported) does not
/// end the interval phase early: interval readers stay excluded until the
/// pair's end, when the PTEs have changed.
#[test]
fn blockable_list_failure_keeps_the_interval_phase_until_end() {
    struct AlwaysFails;
    impl MmuNotifier for AlwaysFails {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START | Callbacks::START_MAY_FAIL
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            Err(Again)
        }
    }
    let mm = Subscriptions::new();
    let s = mm.interval_insert(0x1000, 0x1000, Mirror::new()).unwrap();
    mm.register(Arc::new(AlwaysFails)).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
    assert_eq!(mm.interval_active_ranges(), 1, "still invalidating");
    assert_eq!(mm.interval_seq() & 1, 1);
    inv.end();
    assert_eq!(mm.interval_active_ranges(), 0);
    assert_eq!(
        mm.diagnostics()
            .count(mmu_notifier::Warning::BlockableStartFailed),
        1
    );
    s.remove().unwrap();
}

/// Only an *undeclared* start failure is reported as such.
#[test]
fn declared_start_failures_are_not_reported_as_undeclared() {
    use mmu_notifier::Warning::UndeclaredStartFailure;
    let mm = Subscriptions::new();
    mm.register(Arc::new(FailsNonBlockStart)).unwrap();
    assert!(mm
        .invalidate_range_start_nonblock(range(0, 0x1000))
        .is_err());
    assert_eq!(mm.diagnostics().count(UndeclaredStartFailure), 0);
    let log = new_log();
    let undeclared = Recorder::new("u", Callbacks::INVALIDATE_RANGE_START, &log);
    undeclared.fail_start.store(true, Ordering::SeqCst);
    mm.register(undeclared).unwrap();
    assert!(mm
        .invalidate_range_start_nonblock(range(0, 0x1000))
        .is_err());
    assert_eq!(mm.diagnostics().count(UndeclaredStartFailure), 1);
}

/// The borrowed form of the pair (Linux's shape: the caller keeps its range)
/// behaves as the by-value one: the start marks the caller's range blockable,
/// callbacks see it, the end calls the notifiers the start called.
#[test]
fn a_pair_on_a_range_the_caller_keeps() {
    let (mm, log, a, h) = one_recorder();
    // A range whose flag a non-blockable start cleared (as a callback's copy
    // of it would carry).
    let mut r = mm
        .invalidate_range_start_nonblock(range(0, 0x1000))
        .unwrap()
        .range()
        .to_owned();
    assert!(!r.blockable());
    let inv = mm.invalidate_range_start_in(&mut r);
    assert!(inv.range().blockable());
    let late = register_elsewhere(&mm, "late", &log);
    inv.end();
    assert!(r.blockable(), "the start marks the caller's range");
    assert!(late.calls().is_empty(), "{:?}", late.calls());
    assert_eq!(a.calls().len(), 4, "two pairs: {:?}", a.calls());
    mm.unregister(&h).unwrap();
}
