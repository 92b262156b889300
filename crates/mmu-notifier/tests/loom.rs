//! loom models of the core's races. Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p mmu-notifier --test loom --release`.
#![cfg(loom)]

mod common;

use std::sync::Arc;

use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use loom::thread;
use mmu_notifier::{
    Again, Callbacks, Event, MmuNotifier, NotifierAlloc, Range, Subscriptions, SubscriptionsRef,
};

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
    fn release(&self) {
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
        let mm = Arc::new(Subscriptions::new());
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
        let mm = Arc::new(Subscriptions::new());
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
        _mm: &SubscriptionsRef,
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
        let mm = Arc::new(Subscriptions::new());
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

/// No split pair: a registration racing an in-flight start/end pair never gives
/// the new notifier an end without its start (and 543bdb2d: the callbacks it
/// does get see it fully initialised).
#[test]
fn registration_racing_pair_never_splits_it() {
    loom::model(|| {
        let mm = Arc::new(Subscriptions::new());
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

// ---------------------------------------------------------------------------
// Interval notifiers
// ---------------------------------------------------------------------------

use mmu_notifier::{IntervalNotifier, IntervalOps};

/// A device mirror of one page: `device` holds the primary value it copied,
/// or 0 when unmapped. `invalidate` clears it under the device lock.
struct DevicePage {
    lock: mmu_notifier::CheckedMutex<usize>,
    /// Invalidate calls seen after the test declared the notifier removed.
    after_remove: AtomicUsize,
    removed: AtomicUsize,
}

impl DevicePage {
    fn new() -> Arc<DevicePage> {
        Arc::new(DevicePage {
            lock: mmu_notifier::CheckedMutex::new(0),
            after_remove: AtomicUsize::new(0),
            removed: AtomicUsize::new(0),
        })
    }
}

impl IntervalOps for DevicePage {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, cur_seq: u64) -> bool {
        if self.removed.load(Relaxed) != 0 {
            self.after_remove.fetch_add(1, Relaxed);
        }
        let mut dev = if r.blockable() {
            self.lock.lock()
        } else {
            match self.lock.try_lock() {
                Some(g) => g,
                None => return false,
            }
        };
        sub.set_seq(cur_seq);
        *dev = 0;
        true
    }
}

/// read_begin / read_retry against a concurrent invalidation: a reader that
/// took its sequence before an overlapping invalidation ended never commits
/// a stale copy (the lock-free read side).
#[test]
fn interval_read_side_never_commits_stale() {
    loom::model(|| {
        let mm = Arc::new(Subscriptions::new());
        let dev = DevicePage::new();
        let sub = mm.interval_insert(0, 0x1000, dev.clone()).unwrap();
        // The primary PTE: 1, then changed to 2 inside the invalidation.
        let pte = Arc::new(AtomicUsize::new(1));
        let (mm2, pte2) = (mm.clone(), pte.clone());
        let primary = thread::spawn(move || {
            let inv = mm2.invalidate_range_start(range());
            pte2.store(2, Relaxed);
            inv.end();
        });
        // Device fault, at most two attempts (loom bounds the loop).
        for _ in 0..2 {
            let seq = sub.read_begin().unwrap();
            let v = pte.load(Relaxed);
            let mut d = dev.lock.lock();
            if sub.read_retry(seq) {
                continue;
            }
            *d = v;
            break;
        }
        primary.join().unwrap();
        let d = *dev.lock.lock();
        assert!(
            d == 0 || d == pte.load(Relaxed),
            "device kept the stale value {d}"
        );
        sub.remove().unwrap();
    });
}

/// Insert and remove while an invalidation runs on another thread: they are
/// deferred or applied directly depending on the seq, and at the end the
/// tree holds exactly the inserted notifier, the counters are balanced, and
/// the removed notifier is never called after remove returned.
#[test]
fn interval_insert_and_remove_during_invalidation() {
    loom::model(|| {
        let mm = Arc::new(Subscriptions::new());
        let old = DevicePage::new();
        let s_old = mm.interval_insert(0, 0x1000, old.clone()).unwrap();
        let mm2 = mm.clone();
        let primary = thread::spawn(move || mm2.invalidate_range_start(range()).end());
        let new = mm.interval_insert(0, 0x1000, DevicePage::new()).unwrap();
        s_old.remove().unwrap();
        old.removed.store(1, Relaxed);
        primary.join().unwrap();
        assert_eq!(old.after_remove.load(Relaxed), 0, "called after remove");
        assert!(new.is_in_tree());
        assert!(!s_old.is_in_tree());
        assert_eq!(mm.interval_count(), 1);
        assert_eq!(mm.interval_active_ranges(), 0);
        assert_eq!(mm.interval_seq() & 1, 0);
        new.remove().unwrap();
    });
}

/// 31956166: remove racing the final end of an invalidation returns only
/// after the deferred removal took the notifier out of the tree.
#[test]
fn interval_remove_racing_end() {
    loom::model(|| {
        let mm = Arc::new(Subscriptions::new());
        let dev = DevicePage::new();
        let sub = mm.interval_insert(0, 0x1000, dev.clone()).unwrap();
        let inv = mm.invalidate_range_start(range());
        let sub2 = sub.clone();
        let remover = thread::spawn(move || {
            sub2.remove().unwrap();
            assert!(
                !sub2.is_in_tree(),
                "remove returned while still in the tree"
            );
        });
        // End while the removal is deferred (the window of the race).
        while !sub.is_removed() {
            thread::yield_now();
        }
        inv.end();
        remover.join().unwrap();
    });
}

/// The fix of a Linux leak: when the list phase of a non-blockable start fails after
/// the interval phase succeeded, the interval phase is undone. With Linux's
/// behaviour the reader below would wait forever (loom reports a deadlock).
#[test]
fn interval_accounting_undone_when_list_start_fails() {
    loom::model(|| {
        let mm = Arc::new(Subscriptions::new());
        mm.register(Arc::new(common::FailsNonBlockStart)).unwrap();
        let sub = mm.interval_insert(0, 0x1000, DevicePage::new()).unwrap();
        let mm2 = mm.clone();
        let reaper = thread::spawn(move || {
            assert!(mm2.invalidate_range_start_nonblock(range()).is_err());
        });
        let seq = sub.read_begin().unwrap();
        reaper.join().unwrap();
        assert_eq!(mm.interval_active_ranges(), 0);
        let _ = sub.read_retry(seq);
        sub.remove().unwrap();
    });
}

/// The SRCU handshake itself: a writer unpublishes an object, waits for a
/// grace period and frees it; a reader that still finds the object published
/// inside its section must find it alive. This is what the reader's light
/// fence and the writer's heavy fence (both `fence(SeqCst)` under loom) buy:
/// without the reader's fence loom finds the store-buffering execution in
/// which the grace period misses the reader and the reader sees the freed
/// object.
#[test]
fn grace_period_waits_for_a_reader_that_saw_the_old_object() {
    loom::model(|| {
        // 1: the object is alive, 0: freed.
        let alive = Arc::new(AtomicUsize::new(1));
        let published = Arc::new(AtomicUsize::new(1));
        let (a, p) = (alive.clone(), published.clone());
        let reader = thread::spawn(move || {
            let _section = mmu_notifier::srcu::read_lock();
            if p.load(Relaxed) == 1 {
                assert_eq!(a.load(Relaxed), 1, "a reader used a freed object");
            }
        });
        published.store(0, Relaxed);
        mmu_notifier::srcu::synchronize().unwrap();
        alive.store(0, Relaxed);
        reader.join().unwrap();
    });
}

/// A value of the RCU models: `data` is written after construction and
/// before publication; `alive` is cleared by its destructor (which, under
/// loom, runs without freeing the memory, so a model of a broken retirement
/// reports the use after free as a failed assertion).
struct Val {
    data: AtomicUsize,
    alive: Arc<AtomicUsize>,
}

impl Val {
    fn new(data: usize, alive: &Arc<AtomicUsize>) -> Val {
        let v = Val {
            data: AtomicUsize::new(0),
            alive: alive.clone(),
        };
        v.data.store(data, Relaxed);
        v
    }
}

impl Drop for Val {
    fn drop(&mut self) {
        self.alive.store(0, Relaxed);
    }
}

/// One reader racing one writer on an `RcuCell` holding `Val(1)`: the
/// writer replaces it with `Val(2)` and then runs `after` (given the old and
/// the new value's `alive` flags); the reader runs `read` on what it
/// dereferenced, inside its section.
fn rcu_model(read: fn(&Val), after: fn(&AtomicUsize, &AtomicUsize)) {
    use mmu_notifier::rcu::RcuCell;
    use mmu_notifier::srcu::Domain;
    loom::model(move || {
        let (old_alive, new_alive) = (Arc::new(AtomicUsize::new(1)), Arc::new(AtomicUsize::new(1)));
        let cell = Arc::new(RcuCell::new(Val::new(1, &old_alive), Domain::global()));
        let c = cell.clone();
        let reader = thread::spawn(move || read(&c.enter()));
        cell.lock().replace(Val::new(2, &new_alive));
        after(&old_alive, &new_alive);
        reader.join().unwrap();
    });
}

/// `RcuCell` publication: a reader that finds the new value sees it whole
/// (the writer's stores before `replace` happen-before the reader's use:
/// release on publish, acquire on dereference).
#[test]
fn rcu_publication_is_seen_whole() {
    rcu_model(
        |v| {
            let d = v.data.load(Relaxed);
            assert!(d == 1 || d == 2, "saw a half-initialised value: {d}");
        },
        |_, _| {},
    );
}

/// `RcuCell` retirement: a reader keeps using the old value while the
/// writer replaces it and waits for a grace period; the old value is freed
/// only after the reader's section ended, and is freed by then.
#[test]
fn rcu_reader_keeps_the_old_value_until_the_grace_period() {
    rcu_model(
        |v| {
            let first = v.data.load(Relaxed);
            loom::thread::yield_now();
            assert_eq!(v.alive.load(Relaxed), 1, "a reader used a freed value");
            assert_eq!(v.data.load(Relaxed), first);
        },
        |old_alive, new_alive| {
            // Grace period, then the deferred free of the old value runs.
            mmu_notifier::srcu::Domain::global().barrier().unwrap();
            assert_eq!(old_alive.load(Relaxed), 0, "the old value was not freed");
            assert_eq!(new_alive.load(Relaxed), 1);
        },
    );
}

/// `RcuSlots`: a reader that finds the value a writer published sees it
/// whole, and the slot's `Arc` count is given up only after a grace period
/// that waits for the reader: while the reader's section lasts, the count
/// is still there (the model keeps a count of its own, so a broken
/// retirement shows as a wrong count, never as a freed value).
#[test]
fn rcu_slots_reader_keeps_the_count_until_the_grace_period() {
    use mmu_notifier::rcu::{RcuSlots, SlotEntry};
    use mmu_notifier::srcu::Domain;
    loom::model(|| {
        let alive = Arc::new(AtomicUsize::new(1));
        let keep = Arc::new(Val::new(1, &alive));
        let table = Arc::new(RcuSlots::<Val>::new(2, Domain::global()));
        let t = table.clone();
        let published = keep.clone();
        let reader = thread::spawn(move || {
            let section = Domain::global().read_lock();
            if let Some(v) = t.get(&section, 0) {
                assert_eq!(v.data.load(Relaxed), 1, "saw a half-initialised value");
                let own = v.to_arc();
                thread::yield_now();
                // The model's count, the slot's (retired or not), ours.
                assert_eq!(
                    Arc::strong_count(&own),
                    3,
                    "a slot's count was given up under a reader"
                );
            }
        });
        table.lock().set(
            0,
            Some(SlotEntry {
                key: 7,
                tags: [1, 1],
                stamp: 0,
                value: published,
            }),
        );
        table.lock().set(0, None);
        Domain::global().barrier().unwrap();
        reader.join().unwrap();
        assert_eq!(
            Arc::strong_count(&keep),
            1,
            "the retired count was not given up"
        );
    });
}

/// `RcuSlots` views: a reader racing a writer that replaces a slot's entry
/// sees the key, the tags and the value of one entry (the per-slot sequence
/// count), never a mix of the old and the new.
#[test]
fn rcu_slots_view_is_never_torn() {
    use mmu_notifier::rcu::{RcuSlots, SlotEntry};
    use mmu_notifier::srcu::Domain;
    loom::model(|| {
        let alive = Arc::new(AtomicUsize::new(1));
        let entry = |n: u64| SlotEntry {
            key: n,
            tags: [n, n],
            stamp: 0,
            value: Arc::new(Val::new(n as usize, &alive)),
        };
        let table = Arc::new(RcuSlots::<Val>::new(1, Domain::global()));
        table.lock().set(0, Some(entry(1)));
        let t = table.clone();
        let reader = thread::spawn(move || {
            let section = Domain::global().read_lock();
            if let Some(v) = t.reader(&section).view(0) {
                let n = v.key();
                assert_eq!(v.tags(), [n, n], "a view mixed two entries' key and tags");
                assert_eq!(
                    v.get().data.load(Relaxed),
                    n as usize,
                    "a view's value belongs to another entry than its key"
                );
            }
        });
        table.lock().set(0, Some(entry(2)));
        reader.join().unwrap();
        Domain::global().barrier().unwrap();
    });
}
