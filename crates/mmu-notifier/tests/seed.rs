//! Conformance suite: one test per behaviour-defining commit of the seed
//! history of Linux's `mm/mmu_notifier.c` (the commit named), named
//! `seed_<commit>_<behaviour>`. Each fails if the behaviour it names breaks.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;
use mmu_notifier::{
    Again, Callbacks, Error, Event, MmuNotifier, NotifierAlloc, Owner, PteValue, Range,
    Subscriptions, SubscriptionsRef, Warning, PAGE_SIZE,
};

/// cddb8a5c: the core contract: start before the PTE change, end after, both
/// with the same range, for every registered notifier.
#[test]
fn seed_cddb8a5c_start_and_end_bracket_the_pte_change() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", START_END, &log);
    mm.register(a.clone()).unwrap();
    let r = range(0x10000, 0x20000);
    let inv = mm.invalidate_range_start(r);
    log.lock().unwrap().push(("primary", Call::Release)); // marks "PTEs changed"
    inv.end();
    let l = log.lock().unwrap().clone();
    assert!(matches!(l[0], ("a", Call::Start(x)) if x.start() == 0x10000 && x.end() == 0x20000));
    assert_eq!(l[1].0, "primary");
    assert!(matches!(l[2], ("a", Call::End(x)) if x == r));
}

/// 828502d3: set_pte_at_notify → change_pte reaches every notifier that has
/// it, with the address and the new PTE.
#[test]
fn seed_828502d3_change_pte_reaches_notifiers_with_the_callback() {
    let mm = Subscriptions::new();
    let log = new_log();
    let kvm = Recorder::new("kvm", START_END | Callbacks::CHANGE_PTE, &log);
    let other = Recorder::new("other", START_END, &log);
    mm.register(kvm.clone()).unwrap();
    mm.register(other.clone()).unwrap();
    let pte = PteValue {
        pfn: 42,
        writable: true,
    };
    let inv = mm.invalidate_range_start(range(0x5000, 0x6000));
    mm.change_pte(0x5000, pte);
    inv.end();
    assert!(kvm.calls().contains(&Call::ChangePte(0x5000, pte)));
    assert!(!other
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ChangePte(..))));
}

/// 8ee53820: test_young tests without clearing and stops at the first young
/// notifier (newest first).
#[test]
fn seed_8ee53820_test_young_stops_at_first_young() {
    let mm = Subscriptions::new();
    let log = new_log();
    let old = Recorder::new("old", Callbacks::TEST_YOUNG, &log);
    let mid = Recorder::new("mid", Callbacks::TEST_YOUNG, &log);
    let new = Recorder::new("new", Callbacks::TEST_YOUNG, &log);
    for n in [&old, &mid, &new] {
        mm.register(n.clone()).unwrap();
    }
    assert!(!mm.test_young(0x1000));
    assert_eq!(log.lock().unwrap().len(), 3, "all asked when none is young");
    log.lock().unwrap().clear();
    mid.young.store(true, Ordering::SeqCst);
    assert!(mm.test_young(0x1000));
    let names: Vec<_> = log.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["new", "mid"],
        "newest first, stop at the first young"
    );
}

/// 3ad3d901: release runs *before* the notifier leaves the list, so it is
/// still invalidated while it tears down (a page must never be freed while
/// the secondary still maps it). Checked on the exit and unregister paths.
#[test]
fn seed_3ad3d901_release_runs_before_removal_from_list() {
    struct SeesItself {
        mm: SubscriptionsRef,
        on_list_during_release: AtomicBool,
    }
    impl MmuNotifier for SeesItself {
        fn callbacks(&self) -> Callbacks {
            Callbacks::RELEASE
        }
        fn release(&self) {
            self.on_list_during_release
                .store(self.mm.notifier_count() == 1, Ordering::SeqCst);
        }
    }
    for via_exit in [true, false] {
        let mm = Subscriptions::new();
        let n = Arc::new(SeesItself {
            mm: mm.handle(),
            on_list_during_release: AtomicBool::new(false),
        });
        let h = mm.register(n.clone()).unwrap();
        if via_exit {
            mm.release().unwrap();
        } else {
            mm.unregister(&h).unwrap();
        }
        assert!(
            n.on_list_during_release.load(Ordering::SeqCst),
            "via_exit={via_exit}"
        );
        assert_eq!(mm.notifier_count(), 0);
    }
}

/// 751efd86: unregister racing exit must neither remove the entry twice nor
/// run release twice (we fix the latter: exactly once), and unregister returns
/// only after release finished.
#[test]
fn seed_751efd86_unregister_racing_exit_releases_once() {
    struct Slow {
        releases: AtomicUsize,
        finished: AtomicBool,
    }
    impl MmuNotifier for Slow {
        fn callbacks(&self) -> Callbacks {
            Callbacks::RELEASE
        }
        fn release(&self) {
            self.releases.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_micros(200));
            self.finished.store(true, Ordering::SeqCst);
        }
    }
    for i in 0..200 {
        let mm = Arc::new(Subscriptions::new());
        let n = Arc::new(Slow {
            releases: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
        });
        let h = mm.register(n.clone()).unwrap();
        let go = Arc::new(Barrier::new(2));
        let (mm2, go2) = (mm.clone(), go.clone());
        let exit = thread::spawn(move || {
            go2.wait();
            if i % 2 == 0 {
                thread::yield_now();
            }
            mm2.release().unwrap();
        });
        go.wait();
        mm.unregister(&h).unwrap();
        assert!(
            n.finished.load(Ordering::SeqCst),
            "unregister returned before release finished"
        );
        exit.join().unwrap();
        assert_eq!(n.releases.load(Ordering::SeqCst), 1, "iteration {i}");
        assert_eq!(mm.notifier_count(), 0);
    }
}

/// d34883d4: unregister after exit already unhashed the entry is safe (no
/// double removal), skips release, and still waits for the grace period.
#[test]
fn seed_d34883d4_unregister_after_exit_is_safe() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", Callbacks::RELEASE, &log);
    let b = Recorder::new("b", Callbacks::RELEASE, &log);
    let ha = mm.register(a.clone()).unwrap();
    let _hb = mm.register(b.clone()).unwrap();
    mm.release().unwrap();
    assert_eq!(mm.notifier_count(), 0);
    mm.unregister(&ha).unwrap();
    assert_eq!(a.releases.load(Ordering::SeqCst), 1);
    assert_eq!(b.releases.load(Ordering::SeqCst), 1);
    assert!(matches!(mm.unregister(&ha), Err(Error::NotRegistered)));
}

/// 21a92735: callbacks run under SRCU, so they may sleep; unregister waits for
/// a sleeping callback before returning.
#[test]
fn seed_21a92735_callbacks_may_sleep_and_unregister_waits_for_them() {
    struct Sleeper {
        entered: mpsc::SyncSender<()>,
        release: std::sync::Mutex<mpsc::Receiver<()>>,
        done: AtomicBool,
    }
    impl MmuNotifier for Sleeper {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            self.entered.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap(); // sleeps
            self.done.store(true, Ordering::SeqCst);
            Ok(())
        }
    }
    let (etx, erx) = mpsc::sync_channel(1);
    let (rtx, rrx) = mpsc::channel();
    let mm = Arc::new(Subscriptions::new());
    let n = Arc::new(Sleeper {
        entered: etx,
        release: std::sync::Mutex::new(rrx),
        done: AtomicBool::new(false),
    });
    let h = mm.register(n.clone()).unwrap();
    let mm2 = mm.clone();
    let inv = thread::spawn(move || mm2.invalidate_range_start(range(0, 0x1000)).end());
    erx.recv().unwrap();
    let unreg_done = Arc::new(AtomicBool::new(false));
    let (mm3, ud) = (mm.clone(), unreg_done.clone());
    let unreg = thread::spawn(move || {
        mm3.unregister(&h).unwrap();
        ud.store(true, Ordering::SeqCst);
    });
    thread::sleep(Duration::from_millis(50));
    assert!(
        !unreg_done.load(Ordering::SeqCst),
        "unregister returned while a callback slept"
    );
    rtx.send(()).unwrap();
    unreg.join().unwrap();
    assert!(n.done.load(Ordering::SeqCst));
    inv.join().unwrap();
}

/// 0f0a327f (+1af5a810 rename): the secondary-TLB callback gets the flushed
/// range, including "everything".
#[test]
fn seed_0f0a327f_secondary_tlb_callback_gets_flushed_range() {
    let mm = Subscriptions::new();
    let log = new_log();
    let iommu = Recorder::new("iommu", Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS, &log);
    let kvm = Recorder::new("kvm", START_END, &log);
    mm.register(iommu.clone()).unwrap();
    mm.register(kvm.clone()).unwrap();
    mm.arch_invalidate_secondary_tlbs(0x3000, 0x5000);
    mm.arch_invalidate_secondary_tlbs(0, u64::MAX);
    assert_eq!(
        iommu.calls(),
        [
            Call::SecondaryTlbs(0x3000, 0x5000),
            Call::SecondaryTlbs(0, u64::MAX)
        ]
    );
    assert!(kvm.calls().is_empty());
}

/// 57128468: clear_flush_young takes a range (a PMD may be PTEs in the
/// secondary) and ORs over every notifier, calling all of them.
#[test]
fn seed_57128468_clear_flush_young_takes_range_and_ors_all() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", Callbacks::CLEAR_FLUSH_YOUNG, &log);
    let b = Recorder::new("b", Callbacks::CLEAR_FLUSH_YOUNG, &log);
    mm.register(a.clone()).unwrap();
    mm.register(b.clone()).unwrap();
    a.young.store(true, Ordering::SeqCst);
    let pmd = 512 * PAGE_SIZE;
    assert!(mm.clear_flush_young(pmd, 2 * pmd));
    assert_eq!(
        b.calls(),
        [Call::ClearFlushYoung(pmd, 2 * pmd)],
        "b called though a was young"
    );
    assert_eq!(a.calls(), [Call::ClearFlushYoung(pmd, 2 * pmd)]);
    a.young.store(false, Ordering::SeqCst);
    assert!(!mm.clear_flush_young(0, PAGE_SIZE));
}

/// 1d7715c6: clear_young is its own callback (no flush), ORed over all.
#[test]
fn seed_1d7715c6_clear_young_is_separate_and_ors_all() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new(
        "a",
        Callbacks::CLEAR_YOUNG | Callbacks::CLEAR_FLUSH_YOUNG,
        &log,
    );
    let b = Recorder::new("b", Callbacks::CLEAR_YOUNG, &log);
    mm.register(a.clone()).unwrap();
    mm.register(b.clone()).unwrap();
    b.young.store(true, Ordering::SeqCst);
    assert!(mm.clear_young(0, PAGE_SIZE));
    assert_eq!(
        a.calls(),
        [Call::ClearYoung(0, PAGE_SIZE)],
        "no clear_flush_young"
    );
    assert_eq!(b.calls(), [Call::ClearYoung(0, PAGE_SIZE)]);
}

/// 5f32b265: no per-page callback: a one-page invalidation is a start/end
/// pair over [addr, addr + PAGE_SIZE).
#[test]
fn seed_5f32b265_single_page_invalidation_is_a_range() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", START_END, &log);
    mm.register(a.clone()).unwrap();
    let r = Range::from_len(0x7000, PAGE_SIZE, Event::Clear).unwrap();
    mm.invalidate_range_start(r).end();
    assert_eq!(a.calls(), [Call::Start(r), Call::End(r)]);
}

/// 93065ac7: the blockable flag: callbacks see it, a non-blockable start may
/// fail with Again, and the caller then has no end to call.
#[test]
fn seed_93065ac7_nonblock_start_sets_flag_and_may_fail() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new(
        "a",
        Callbacks::INVALIDATE_RANGE_START | Callbacks::START_MAY_FAIL,
        &log,
    );
    mm.register(a.clone()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    let inv = mm
        .invalidate_range_start_nonblock(range(0, 0x1000))
        .unwrap();
    assert!(!inv.range().blockable());
    inv.end();
    a.fail_start.store(true, Ordering::SeqCst);
    assert_eq!(
        mm.invalidate_range_start_nonblock(range(0, 0x1000)).err(),
        Some(Again)
    );
    let flags: Vec<bool> = a
        .calls()
        .iter()
        .map(|c| match c {
            Call::Start(r) => r.blockable(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(flags, [true, false, false]);
}

/// 5d6527a7 (+ the event/owner patches of the series): callbacks get a range
/// object with the event and, for Migrate/Exclusive, the owner.
#[test]
fn seed_5d6527a7_range_carries_event_and_owner() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", START_END, &log);
    mm.register(a.clone()).unwrap();
    let owner = Owner(0xdead);
    let r1 = Range::with_owner(0, 0x2000, Event::Migrate, Some(owner)).unwrap();
    let r2 = Range::new(0, 0x2000, Event::SoftDirty).unwrap();
    mm.invalidate_range_start(r1).end();
    mm.invalidate_range_start(r2).end();
    let c = a.calls();
    assert!(
        matches!(c[0], Call::Start(r) if r.event() == Event::Migrate && r.owner() == Some(owner))
    );
    assert!(matches!(c[2], Call::Start(r) if r.event() == Event::SoftDirty && r.owner().is_none()));
    assert!(Range::with_owner(0, 0x1000, Event::Unmap, Some(owner)).is_err());
}

struct Alloc {
    allocated: AtomicUsize,
    freed: AtomicUsize,
    log: Log,
}
impl NotifierAlloc for Alloc {
    fn alloc_notifier(
        &self,
        _mm: &SubscriptionsRef,
    ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
        self.allocated.fetch_add(1, Ordering::SeqCst);
        Ok(Recorder::new(
            "got",
            START_END | Callbacks::RELEASE,
            &self.log,
        ))
    }
    fn free_notifier(&self, _n: Arc<dyn MmuNotifier>) {
        self.freed.fetch_add(1, Ordering::SeqCst);
    }
}

/// 2c7933f5: get/put keyed by the ops' identity: one notifier per (mm, ops),
/// refcounted, freed after a grace period once the last put happened; a get
/// after that allocates afresh.
#[test]
fn seed_2c7933f5_get_put_keyed_by_ops_identity() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Arc::new(Alloc {
        allocated: AtomicUsize::new(0),
        freed: AtomicUsize::new(0),
        log: log.clone(),
    });
    let b = Arc::new(Alloc {
        allocated: AtomicUsize::new(0),
        freed: AtomicUsize::new(0),
        log: log.clone(),
    });
    let (ops_a, ops_b): (Arc<dyn NotifierAlloc>, Arc<dyn NotifierAlloc>) = (a.clone(), b.clone());
    let h1 = mm.get(&ops_a).unwrap();
    let h2 = mm.get(&ops_a).unwrap();
    let h3 = mm.get(&ops_b).unwrap();
    assert!(Arc::ptr_eq(h1.notifier(), h2.notifier()));
    assert!(!Arc::ptr_eq(h1.notifier(), h3.notifier()));
    assert_eq!((a.allocated.load(Ordering::SeqCst), h1.users()), (1, 2));
    assert_eq!(mm.notifier_count(), 2);
    mm.put(&h1).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert_eq!(mm.notifier_count(), 2, "still referenced");
    mm.put(&h2).unwrap();
    assert_eq!(mm.notifier_count(), 1);
    mmu_notifier::synchronize().unwrap();
    assert_eq!(a.freed.load(Ordering::SeqCst), 1);
    assert!(matches!(mm.unregister(&h3), Err(Error::ManagedByGetPut)));
    let h4 = mm.get(&ops_a).unwrap();
    assert_eq!(
        a.allocated.load(Ordering::SeqCst),
        2,
        "fresh notifier after the final put"
    );
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| matches!(c, Call::Release))
            .count(),
        0,
        "put never calls release"
    );
    mm.put(&h4).unwrap();
    mm.put(&h3).unwrap();
    mmu_notifier::synchronize().unwrap();
    assert_eq!(
        (
            a.freed.load(Ordering::SeqCst),
            b.freed.load(Ordering::SeqCst)
        ),
        (2, 1)
    );
}

/// 8402ce61: a start failing in a blockable range is a reported bug.
#[test]
fn seed_8402ce61_blockable_start_failure_is_reported() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new(
        "a",
        Callbacks::INVALIDATE_RANGE_START | Callbacks::START_MAY_FAIL,
        &log,
    );
    mm.register(a.clone()).unwrap();
    a.fail_start.store(true, Ordering::SeqCst);
    assert!(mm
        .invalidate_range_start_nonblock(range(0, 0x1000))
        .is_err());
    assert_eq!(
        mm.diagnostics().count(Warning::BlockableStartFailed),
        0,
        "nonblock failure is legal"
    );
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert_eq!(mm.diagnostics().count(Warning::BlockableStartFailed), 1);
}

/// ba170f76: sleeping (might_sleep, a blocking lock) inside a non-blockable
/// callback is reported; the same in a blockable one is not.
#[cfg(debug_assertions)]
#[test]
fn seed_ba170f76_sleeping_in_nonblockable_callback_is_reported() {
    struct Locks(mmu_notifier::CheckedMutex<u32>);
    impl MmuNotifier for Locks {
        fn callbacks(&self) -> Callbacks {
            START_END
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            *self.0.lock() += 1;
            Ok(())
        }
        fn invalidate_range_end(&self, _r: &Range) {
            mmu_notifier::might_sleep();
        }
    }
    let mm = Subscriptions::new();
    mm.register(Arc::new(Locks(mmu_notifier::CheckedMutex::new(0))))
        .unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert_eq!(mm.diagnostics().count(Warning::SleepInNonBlockable), 0);
    mm.invalidate_range_start_nonblock(range(0, 0x1000))
        .unwrap()
        .end();
    assert_eq!(
        mm.diagnostics().count(Warning::SleepInNonBlockable),
        2,
        "start's lock and end's might_sleep"
    );
    mmu_notifier::might_sleep(); // outside any callback: fine
    assert_eq!(mm.diagnostics().count(Warning::SleepInNonBlockable), 2);
}

/// 23b68395: the lockdep map catches recursion into the invalidate path of
/// the same address space from a callback; we report it instead of hanging.
#[cfg(debug_assertions)]
#[test]
fn seed_23b68395_recursion_into_invalidate_is_reported() {
    struct Recurse {
        mm: std::sync::OnceLock<Arc<Subscriptions>>,
        depth: AtomicUsize,
    }
    impl MmuNotifier for Recurse {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            if self.depth.fetch_add(1, Ordering::SeqCst) == 0 {
                let mm = self.mm.get().unwrap();
                mm.invalidate_range_start(range(0x1000, 0x2000)).end();
            }
            Ok(())
        }
    }
    let mm = Arc::new(Subscriptions::new());
    let other = Subscriptions::new();
    let n = Arc::new(Recurse {
        mm: Default::default(),
        depth: AtomicUsize::new(0),
    });
    n.mm.set(mm.clone()).unwrap();
    mm.register(n.clone()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    // The nested start and the nested end each re-entered the path.
    assert_eq!(mm.diagnostics().count(Warning::Recursion), 2);
    assert_eq!(n.depth.load(Ordering::SeqCst), 2);
    other.invalidate_range_start(range(0, 0x1000)).end();
    assert_eq!(other.diagnostics().count(Warning::Recursion), 0);
}

/// 543bdb2d: registration publishes the notifier fully initialised, so a
/// concurrent invalidation never sees a half-initialised one. Here the new
/// list snapshot is published with the release store of
/// `RcuWriteGuard::replace` and read with an acquire load, the ordering
/// Linux gets from `hlist_add_head_rcu` and `srcu_dereference` (the loom
/// model `rcu_publication_is_seen_whole` checks it on a weak memory model).
#[test]
fn seed_543bdb2d_concurrent_invalidation_sees_initialised_notifier() {
    struct Init {
        magic: u64,
        seen_bad: Arc<AtomicUsize>,
    }
    impl MmuNotifier for Init {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            if self.magic != 0x5eed {
                self.seen_bad.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    }
    let mm = Arc::new(Subscriptions::new());
    let bad = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let (mm2, stop2, rounds2) = (mm.clone(), stop.clone(), rounds.clone());
    let t = thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            mm2.invalidate_range_start(range(0, 0x1000)).end();
            rounds2.fetch_add(1, Ordering::SeqCst);
        }
    });
    for _ in 0..500 {
        mm.register(Arc::new(Init {
            magic: 0x5eed,
            seen_bad: bad.clone(),
        }))
        .unwrap();
    }
    // The invalidating thread must really have run alongside (and after)
    // the registrations, however late it was scheduled.
    let seen = rounds.load(Ordering::SeqCst);
    while rounds.load(Ordering::SeqCst) <= seen {
        thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert!(rounds.load(Ordering::SeqCst) > 0);
    assert_eq!(bad.load(Ordering::SeqCst), 0);
}

/// 543bdb2d, the other half: once registration has returned, an
/// invalidation sees the new notifier, even on a thread that walked the list
/// before. Linux gets this from the release store that publishes the entry;
/// here every walk dereferences the published snapshot afresh.
#[test]
fn seed_543bdb2d_registered_notifier_seen_by_a_thread_with_a_cached_list() {
    let mm = Subscriptions::new();
    let log = new_log();
    let a = Recorder::new("a", START_END, &log);
    mm.register(a.clone()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end(); // this thread caches [a]
    let b = Recorder::new("b", START_END, &log);
    mm.register(b.clone()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    let starts = |who: &str| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(n, c)| *n == who && matches!(c, Call::Start(_)))
            .count()
    };
    assert_eq!(starts("b"), 1, "the new notifier was missed");
    assert_eq!(starts("a"), 2);
}

/// c2655835: when a start fails, every notifier's end is still called
/// (including the ones whose start succeeded), every start was called.
#[test]
fn seed_c2655835_end_called_for_all_after_failed_start() {
    let mm = Subscriptions::new();
    let log = new_log();
    let oldest = Recorder::new("oldest", START_END, &log);
    let failing = Recorder::new(
        "failing",
        Callbacks::INVALIDATE_RANGE_START | Callbacks::START_MAY_FAIL,
        &log,
    );
    let end_only = Recorder::new("end_only", Callbacks::INVALIDATE_RANGE_END, &log);
    let newest = Recorder::new("newest", START_END, &log);
    for n in [&oldest, &failing, &end_only, &newest] {
        mm.register(n.clone()).unwrap();
    }
    failing.fail_start.store(true, Ordering::SeqCst);
    let r = range(0, 0x4000);
    assert!(mm.invalidate_range_start_nonblock(r).is_err());
    let l: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(n, c)| (*n, matches!(c, Call::Start(_))))
        .collect();
    assert_eq!(
        l,
        [
            ("newest", true),
            ("failing", true),
            ("oldest", true), // starts continue after the failure
            ("newest", false),
            ("end_only", false),
            ("oldest", false),
        ]
    );
    assert_eq!(mm.diagnostics().count(Warning::FailingStartHasEnd), 0);
}

/// 1af5a810: a notifier may have the secondary-TLB callback or start/end, not
/// both; one whose start may fail may not have end (c2655835). Both refused.
#[test]
fn seed_1af5a810_secondary_tlb_with_start_end_is_refused() {
    let mm = Subscriptions::new();
    let log = new_log();
    let mixed = Recorder::new(
        "mixed",
        Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS | Callbacks::INVALIDATE_RANGE_END,
        &log,
    );
    assert!(matches!(
        mm.register(mixed),
        Err(Error::SecondaryTlbWithStartEnd)
    ));
    assert_eq!(mm.diagnostics().count(Warning::SecondaryTlbWithStartEnd), 1);
    let failing_end = Recorder::new("f", START_END | Callbacks::START_MAY_FAIL, &log);
    assert!(matches!(
        mm.register(failing_end),
        Err(Error::FailingStartWithEnd)
    ));
    assert_eq!(mm.notifier_count(), 0);
    assert!(
        !mm.has_notifiers(),
        "a refused registration changes nothing"
    );
}

/// ec8832d0: invalidate_range_end no longer invalidates secondary TLBs; only
/// the primary's TLB flush hook does.
#[test]
fn seed_ec8832d0_end_does_not_flush_secondary_tlbs() {
    let mm = Subscriptions::new();
    let log = new_log();
    let iommu = Recorder::new("iommu", Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS, &log);
    mm.register(iommu.clone()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert!(iommu.calls().is_empty());
    mm.arch_invalidate_secondary_tlbs(0, 0x1000);
    assert_eq!(iommu.calls(), [Call::SecondaryTlbs(0, 0x1000)]);
}

// ---------------------------------------------------------------------------
// Interval notifiers (99cb252f, 31956166, c9682d10)
// ---------------------------------------------------------------------------

/// Runs `f` on a thread and returns a receiver for its result, so a test can
/// check that it is still blocked and later that it finished.
fn spawn_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// A blocked call must stay blocked for a while (a delay cannot make this
/// check fail wrongly, only miss a bug).
fn assert_blocked<T: std::fmt::Debug>(rx: &mpsc::Receiver<T>) {
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "returned while it should have been waiting"
    );
}

fn done<T>(rx: &mpsc::Receiver<T>) -> T {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("still blocked 10 s after the invalidation ended")
}

/// 99cb252f: interval notifiers get `invalidate` for overlapping ranges only,
/// in ascending start order, with an odd `cur_seq` that they record; the mm
/// seq is odd during the invalidation and even after.
#[test]
fn seed_99cb252f_invalidate_overlapping_intervals_in_tree_order() {
    let mm = Subscriptions::new();
    let (a, b, c) = (Mirror::new(), Mirror::new(), Mirror::new());
    let sa = mm.interval_insert(0x5000, 0x2000, a.clone()).unwrap();
    let sb = mm.interval_insert(0x1000, 0x5000, b.clone()).unwrap();
    let sc = mm.interval_insert(0x9000, 0x1000, c.clone()).unwrap();
    assert_eq!(mm.interval_seq(), 2);
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Order(Arc<std::sync::Mutex<Vec<u64>>>);
    impl mmu_notifier::IntervalOps for Order {
        fn invalidate(&self, s: &mmu_notifier::IntervalNotifier, _: &Range, seq: u64) -> bool {
            s.set_seq(seq);
            self.0.lock().unwrap().push(s.start());
            true
        }
    }
    let so = mm
        .interval_insert(0x4000, 0x1000, Arc::new(Order(order.clone())))
        .unwrap();
    let seq_a = sa.read_begin().unwrap();
    let inv = mm.invalidate_range_start(range(0x4000, 0x6000));
    assert_eq!(mm.interval_seq(), 3, "odd while an interval is invalidated");
    assert!(sa.read_retry(seq_a), "the reader from before must retry");
    assert_eq!(a.calls().len(), 1);
    assert_eq!(a.calls()[0].1, 3);
    assert_eq!(b.calls().len(), 1);
    assert!(c.calls().is_empty(), "[0x9000,0xa000) does not overlap");
    assert_eq!(*order.lock().unwrap(), [0x4000]);
    inv.end();
    assert!(
        sa.read_retry(seq_a),
        "and still after it completed: the sequence, not the running state, decides"
    );
    assert_eq!(mm.interval_seq(), 4);
    assert_eq!(mm.interval_active_ranges(), 0);
    // A range touching nobody leaves the seq even.
    mm.invalidate_range_start(range(0x20000, 0x21000)).end();
    assert_eq!(mm.interval_seq(), 4);
    for s in [sa, sb, sc, so] {
        s.remove().unwrap();
    }
}

/// 99cb252f: read_begin sleeps while its notifier is being invalidated and
/// returns when the last in-flight range ends; a notifier not touched is
/// never made to wait (only the seq equality decides).
#[test]
fn seed_99cb252f_read_begin_waits_for_the_invalidation() {
    let mm = Subscriptions::new();
    let m = Mirror::new();
    let s = mm.interval_insert(0x1000, 0x1000, m.clone()).unwrap();
    let other = mm.interval_insert(0x8000, 0x1000, Mirror::new()).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
    let seq = mm.interval_seq();
    assert_eq!(seq & 1, 1);
    // `other` was not invalidated: its seq differs, no wait.
    let oseq = other.read_begin().unwrap();
    assert!(!other.read_retry(oseq));
    let s2 = s.clone();
    let rx = spawn_blocking(move || s2.read_begin().unwrap());
    assert_blocked(&rx);
    inv.end();
    assert_eq!(done(&rx), seq);
    assert!(!s.read_retry(seq));
    s.remove().unwrap();
    other.remove().unwrap();
}

/// 99cb252f: while the tree is frozen (odd seq) inserts and removes are
/// deferred and applied at the last end; an insert during an even in-flight
/// period goes straight in and makes the seq odd.
#[test]
fn seed_99cb252f_membership_changes_deferred_while_odd() {
    let mm = Subscriptions::new();
    let a = mm.interval_insert(0x1000, 0x1000, Mirror::new()).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
    assert_eq!(mm.interval_seq(), 3);
    let b_ops = Mirror::new();
    let b = mm.interval_insert(0x1000, 0x1000, b_ops.clone()).unwrap();
    assert!(!b.is_in_tree(), "insert while odd is deferred");
    assert!(b.is_invalidating(), "read_begin would wait");
    // A nested invalidation of b's range does not call b: not in the tree.
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    assert!(b_ops.calls().is_empty());
    assert_eq!(mm.interval_count(), 1);
    inv.end();
    assert!(b.is_in_tree());
    assert_eq!(mm.interval_seq(), 4);

    // Partially excluded: in flight but matching nobody, seq stays even...
    let inv = mm.invalidate_range_start(range(0x40000, 0x41000));
    assert_eq!(mm.interval_seq(), 4);
    // ...until an insert, which goes straight in and makes it odd.
    let c = mm.interval_insert(0x50000, 0x1000, Mirror::new()).unwrap();
    assert!(c.is_in_tree());
    assert_eq!(mm.interval_seq(), 5);
    assert!(c.is_invalidating(), "read_begin would wait");
    inv.end();
    assert_eq!(mm.interval_seq(), 6);
    for s in [a, b, c] {
        s.remove().unwrap();
    }
    assert_eq!(mm.interval_count(), 0);
}

/// 99cb252f: a non-blockable invalidation whose interval callback cannot
/// proceed fails with Again, calls no list notifier, and undoes its own
/// accounting (the caller will not call end).
#[test]
fn seed_99cb252f_nonblock_interval_failure_skips_the_list() {
    let mm = Subscriptions::new();
    let log = new_log();
    let rec = Recorder::new("list", START_END, &log);
    mm.register(rec.clone()).unwrap();
    let m = Mirror::new();
    m.fail_nonblock.store(true, Ordering::SeqCst);
    let s = mm.interval_insert(0x1000, 0x1000, m.clone()).unwrap();
    let r = mm.invalidate_range_start_nonblock(range(0x1000, 0x2000));
    assert_eq!(r.err(), Some(Again));
    assert!(log.lock().unwrap().is_empty(), "no list notifier is called");
    assert_eq!(mm.interval_active_ranges(), 0);
    assert_eq!(mm.interval_seq() & 1, 0);
    // Blockable ranges never fail: false is reported and treated as true.
    m.fail_nonblock.store(false, Ordering::SeqCst);
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    assert_eq!(m.calls().len(), 1);
    s.remove().unwrap();
}

/// 31956166: remove during an invalidation waits, and returns only once the
/// final end has taken the notifier out of the tree (the seq is read under
/// the lock: the final end changes it and walks the deferred list in one
/// critical section). Repeated to give the race a chance.
#[test]
fn seed_31956166_remove_returns_only_after_the_deferred_removal() {
    for _ in 0..300 {
        let mm = Subscriptions::new();
        let m = Mirror::new();
        let s = mm.interval_insert(0x1000, 0x1000, m.clone()).unwrap();
        let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
        let s2 = s.clone();
        let start = Arc::new(Barrier::new(2));
        let start2 = start.clone();
        let rx = spawn_blocking(move || {
            start2.wait();
            s2.remove().unwrap();
            // When remove returns, the notifier must be out of the tree.
            s2.is_in_tree()
        });
        start.wait();
        // End exactly while the remover is deferred and waiting.
        while !s.is_removed() {
            thread::yield_now();
        }
        inv.end();
        assert!(!done(&rx), "remove returned while still linked in the tree");
        let before = m.calls().len();
        mm.invalidate_range_start(range(0x1000, 0x2000)).end();
        assert_eq!(m.calls().len(), before, "invalidate after remove returned");
    }
}

/// 31956166 (deterministic half): remove while the seq is odd sleeps until
/// the invalidation ends.
#[test]
fn seed_31956166_remove_waits_while_invalidating() {
    let mm = Subscriptions::new();
    let s = mm.interval_insert(0x1000, 0x1000, Mirror::new()).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
    let s2 = s.clone();
    let rx = spawn_blocking(move || s2.remove());
    assert_blocked(&rx);
    assert!(s.is_in_tree());
    inv.end();
    done(&rx).unwrap();
    assert!(!s.is_in_tree());
    assert!(matches!(s.remove(), Err(Error::NotRegistered)));
}

/// c9682d10: insert checks that the address space is still *live* (Linux
/// `mm_users`), not merely that the object exists (`mm_count`): after exit
/// it is refused even though we still hold the address space.
#[test]
fn seed_c9682d10_insert_refused_once_the_address_space_exited() {
    let mm = Subscriptions::new();
    let before = mm.interval_insert(0x1000, 0x1000, Mirror::new()).unwrap();
    mm.release().unwrap();
    let held = mm.clone(); // the object is alive (mm_count > 0)...
    assert!(matches!(
        held.interval_insert(0x3000, 0x1000, Mirror::new()),
        Err(Error::AddressSpaceExited)
    ));
    // A fresh address space that never enabled interval mode, same rule.
    let mm2 = Subscriptions::new();
    mm2.release().unwrap();
    assert!(matches!(
        mm2.interval_insert(0x3000, 0x1000, Mirror::new()),
        Err(Error::AddressSpaceExited)
    ));
    before.remove().unwrap();
}

/// A worked sequence of the interval scheme (two overlapping invalidations,
/// a reader, deferred insert and remove), step by step.
#[test]
fn spec_4_11_worked_sequence() {
    let mm = Subscriptions::new();
    assert_eq!(mm.interval_seq(), 2);
    // Insert A while idle: A.seq = 1, in the tree.
    let a = mm.interval_insert(0x1000, 0x2000, Mirror::new()).unwrap();
    assert_eq!(a.last(), 0x2fff);
    assert!(a.is_in_tree());
    // read_begin(A) returns 1 at once.
    assert_eq!(a.read_begin().unwrap(), 1);
    // Invalidate [0x2000, 0x3000): active 1, seq 3, A.seq = 3.
    let inv = mm.invalidate_range_start(range(0x2000, 0x3000));
    assert_eq!(mm.interval_active_ranges(), 1);
    assert_eq!(mm.interval_seq(), 3);
    assert!(a.check_retry(1));
    // A new reader sleeps (3 == 3).
    let a2 = a.clone();
    let sleeping_reader = spawn_blocking(move || a2.read_begin().unwrap());
    assert_blocked(&sleeping_reader);
    // The reader from before must retry.
    assert!(a.read_retry(1));
    // Insert B now: deferred, B.seq = 3.
    let b = mm.interval_insert(0x100000, 0x1000, Mirror::new()).unwrap();
    assert!(!b.is_in_tree());
    let b2 = b.clone();
    let reader_b = spawn_blocking(move || b2.read_begin().unwrap());
    // Remove A now: deferred, waits for seq != 3.
    let a3 = a.clone();
    let remover = spawn_blocking(move || a3.remove());
    assert_blocked(&remover);
    assert_blocked(&reader_b);
    // Range end: seq 4, A out, B in, everyone woken.
    inv.end();
    assert_eq!(mm.interval_seq(), 4);
    assert_eq!(mm.interval_active_ranges(), 0);
    done(&remover).unwrap();
    assert!(!a.is_in_tree());
    assert!(b.is_in_tree());
    assert_eq!(done(&sleeping_reader), 3);
    assert_eq!(done(&reader_b), 3);
    assert!(!b.read_retry(3));
    // Invalidate a range overlapping nothing: active 1, seq stays 4.
    let inv = mm.invalidate_range_start(range(0x200000, 0x201000));
    assert_eq!(mm.interval_active_ranges(), 1);
    assert_eq!(mm.interval_seq(), 4);
    // Insert C: seq 5, C straight into the tree with C.seq = 5.
    let c = mm.interval_insert(0x300000, 0x1000, Mirror::new()).unwrap();
    assert_eq!(mm.interval_seq(), 5);
    assert!(c.is_in_tree());
    assert!(c.check_retry(4) && !c.check_retry(5));
    // End: seq 6.
    inv.end();
    assert_eq!(mm.interval_seq(), 6);
    b.remove().unwrap();
    c.remove().unwrap();
}
