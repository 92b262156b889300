//! loom models of the core's races. Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p mmu-notifier --test loom --release`.
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use loom::thread;
use mmu_notifier::{Again, Callbacks, Event, MmuNotifier, NotifierAlloc, Range, Subscriptions};

/// Counts callbacks with loom atomics, so loom checks what is visible when.
#[derive(Default)]
struct Counting {
    callbacks: Callbacks,
    starts: AtomicUsize,
    ends: AtomicUsize,
    releases: AtomicUsize,
    /// Written before registration; must be seen by every callback (543bdb2d).
    init: AtomicUsize,
    /// Number of deferred frees that ran.
    freed: Arc<AtomicUsize>,
    /// Callbacks running now (read-modify-writes, so a free observes the
    /// latest value and cannot miss a running callback).
    inside: AtomicUsize,
}

impl Counting {
    fn new(callbacks: Callbacks) -> Arc<Counting> {
        let c = Counting {
            callbacks,
            ..Default::default()
        };
        c.init.store(42, Relaxed);
        Arc::new(c)
    }
    fn check(&self) {
        assert_eq!(
            self.init.load(Relaxed),
            42,
            "saw a half-initialised notifier"
        );
    }
}

impl MmuNotifier for Counting {
    fn callbacks(&self) -> Callbacks {
        self.callbacks
    }
    fn release(&self, _mm: &Subscriptions) {
        self.check();
        self.releases.fetch_add(1, Relaxed);
    }
    fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
        self.inside.fetch_add(1, Relaxed);
        self.check();
        self.starts.fetch_add(1, Relaxed);
        self.inside.fetch_sub(1, Relaxed);
        Ok(())
    }
    fn invalidate_range_end(&self, _r: &Range) {
        self.check();
        self.ends.fetch_add(1, Relaxed);
    }
}

fn range() -> Range {
    Range::new(0, 0x1000, Event::Unmap).unwrap()
}

const FULL: Callbacks = Callbacks::RELEASE
    .union(Callbacks::INVALIDATE_RANGE_START)
    .union(Callbacks::INVALIDATE_RANGE_END);

/// 751efd86 / 3ad3d901 / d34883d4: unregister racing exit. `release` runs
/// exactly once, has finished when unregister returns, and nothing runs after.
#[test]
fn unregister_racing_exit_releases_exactly_once() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let n = Counting::new(FULL);
        let h = mm.register(n.clone()).unwrap();
        let mm2 = mm.clone();
        let exit = thread::spawn(move || mm2.release().unwrap());
        mm.unregister(&h).unwrap();
        assert_eq!(
            n.releases.load(Relaxed),
            1,
            "release not finished when unregister returned"
        );
        exit.join().unwrap();
        assert_eq!(n.releases.load(Relaxed), 1, "release ran twice");
    });
}

/// No callback of a notifier runs after unregister returns, with an
/// invalidation in flight on another thread.
#[test]
fn no_callback_after_unregister_returns() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let n = Counting::new(FULL);
        let h = mm.register(n.clone()).unwrap();
        let mm2 = mm.clone();
        let inv = thread::spawn(move || mm2.invalidate_range_start(range()).end());
        mm.unregister(&h).unwrap();
        let seen = (
            n.starts.load(Relaxed),
            n.ends.load(Relaxed),
            n.releases.load(Relaxed),
        );
        inv.join().unwrap();
        let after = (
            n.starts.load(Relaxed),
            n.ends.load(Relaxed),
            n.releases.load(Relaxed),
        );
        assert_eq!(seen, after, "a callback ran after unregister returned");
        assert!(after.1 <= after.0, "end without start");
    });
}

struct Alloc(Arc<Counting>);
impl NotifierAlloc for Alloc {
    fn alloc_notifier(
        &self,
        _mm: &Subscriptions,
    ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.0.clone())
    }
    fn free_notifier(&self, _n: Arc<dyn MmuNotifier>) {
        assert_eq!(
            self.0.inside.fetch_add(0, Relaxed),
            0,
            "freed while a callback runs"
        );
        self.0.freed.fetch_add(1, Relaxed);
    }
}

/// 2c7933f5: a put racing an in-flight invalidation frees only after the
/// grace period: the callback never observes its own free.
#[test]
fn put_racing_invalidation_frees_after_grace_period() {
    loom::model(|| {
        let mm = Subscriptions::new();
        let n = Counting::new(Callbacks::INVALIDATE_RANGE_START);
        let ops: Arc<dyn NotifierAlloc> = Arc::new(Alloc(n.clone()));
        let h = mm.get(&ops).unwrap();
        let mm2 = mm.clone();
        let inv = thread::spawn(move || mm2.invalidate_range_start(range()).end());
        mm.put(&h).unwrap();
        mmu_notifier::synchronize().unwrap();
        assert_eq!(
            n.freed.load(Relaxed),
            1,
            "synchronize returned before the free ran"
        );
        inv.join().unwrap();
    });
}

/// Spec 10.10: a registration racing an in-flight start/end pair never gives
/// the new notifier an end without its start (and 543bdb2d: the callbacks it
/// does get see it fully initialised).
#[test]
fn registration_racing_pair_never_splits_it() {
    loom::model(|| {
        let mm = Subscriptions::new();
        // Someone is already registered, so the hooks take the list path.
        let first = Counting::new(FULL);
        mm.register(first.clone()).unwrap();
        let late = Counting::new(FULL);
        let (mm2, late2) = (mm.clone(), late.clone());
        let reg = thread::spawn(move || {
            mm2.register(late2).unwrap();
        });
        mm.invalidate_range_start(range()).end();
        reg.join().unwrap();
        assert_eq!(late.starts.load(Relaxed), late.ends.load(Relaxed));
        assert_eq!(first.starts.load(Relaxed), 1);
        assert_eq!(first.ends.load(Relaxed), 1);
    });
}
