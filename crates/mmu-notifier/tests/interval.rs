//! Interval notifiers: bad input, the fix of Linux's leak after a failed start, deadlock refusal,
//! panicking callbacks and exit.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use mmu_notifier::{
    Again, Error, Event, IntervalNotifier, IntervalOps, Range, Subscriptions, Warning,
};

#[test]
fn bad_lengths_are_refused() {
    let mm = Subscriptions::new();
    assert!(matches!(
        mm.interval_insert(0x1000, 0, Mirror::new()),
        Err(Error::InvalidInterval { length: 0, .. })
    ));
    assert!(matches!(
        mm.interval_insert(u64::MAX - 10, 12, Mirror::new()),
        Err(Error::InvalidInterval { .. })
    ));
    // The largest valid interval ends exactly at u64::MAX.
    let s = mm
        .interval_insert(u64::MAX - 10, 11, Mirror::new())
        .unwrap();
    assert_eq!(s.last(), u64::MAX);
    s.remove().unwrap();
}

#[test]
fn remove_twice_and_read_begin_after_remove_are_errors() {
    let mm = Subscriptions::new();
    let s = mm.interval_insert(0x1000, 0x1000, Mirror::new()).unwrap();
    s.remove().unwrap();
    assert!(matches!(s.remove(), Err(Error::NotRegistered)));
    assert!(matches!(s.read_begin(), Err(Error::NotRegistered)));
}

/// The fix of a Linux leak: Linux leaves `active_invalidate_ranges` raised (and the
/// seq odd) when the list phase fails after the interval phase; then this
/// read_begin would sleep forever and this remove too. We undo it.
#[test]
fn list_failure_after_interval_phase_is_undone() {
    let mm = Subscriptions::new();
    mm.register(Arc::new(FailsNonBlockStart)).unwrap();
    let m = Mirror::new();
    let s = mm.interval_insert(0x1000, 0x1000, m.clone()).unwrap();
    let r = mm.invalidate_range_start_nonblock(range(0x1000, 0x2000));
    assert_eq!(r.err(), Some(Again));
    assert_eq!(m.calls().len(), 1, "the interval phase ran");
    assert_eq!(
        mm.interval_active_ranges(),
        0,
        "the leak Linux has after a failed start"
    );
    assert_eq!(mm.interval_seq() & 1, 0);
    assert!(!s.is_invalidating());
    let seq = s.read_begin().unwrap();
    assert!(!s.read_retry(seq));
    s.remove().unwrap();
}

/// Calls read_begin and remove on its own notifier from `invalidate`.
struct SelfWaiter {
    results: std::sync::Mutex<Vec<String>>,
}
impl IntervalOps for SelfWaiter {
    fn invalidate(&self, sub: &IntervalNotifier, _r: &Range, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        let mut res = self.results.lock().unwrap();
        res.push(format!("{:?}", sub.read_begin().map(|_| ())));
        res.push(format!("{:?}", sub.remove()));
        true
    }
}

#[test]
fn read_begin_and_remove_from_own_callback_refused_not_deadlocked() {
    let mm = Subscriptions::new();
    let w = Arc::new(SelfWaiter {
        results: std::sync::Mutex::new(Vec::new()),
    });
    let s = mm.interval_insert(0x1000, 0x1000, w.clone()).unwrap();
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    let res = w.results.lock().unwrap().clone();
    assert_eq!(res.len(), 2);
    assert!(res.iter().all(|r| r.contains("WouldDeadlock")), "{res:?}");
    assert!(s.is_in_tree(), "a refused remove changes nothing");
    s.remove().unwrap();
}

struct Panicker;
impl IntervalOps for Panicker {
    fn invalidate(&self, _s: &IntervalNotifier, _r: &Range, _c: u64) -> bool {
        panic!("driver bug");
    }
}

#[test]
fn panicking_interval_callback_is_reported_and_the_mm_stays_usable() {
    let mm = Subscriptions::new();
    let p = mm
        .interval_insert(0x1000, 0x1000, Arc::new(Panicker))
        .unwrap();
    let m = Mirror::new();
    let s = mm.interval_insert(0x1000, 0x1000, m.clone()).unwrap();
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    assert_eq!(m.calls().len(), 1, "the next notifier still ran");
    assert_eq!(mm.diagnostics().count(Warning::CallbackPanicked), 1);
    assert_eq!(mm.interval_active_ranges(), 0);
    assert_eq!(mm.interval_seq() & 1, 0);
    p.remove().unwrap();
    s.remove().unwrap();
}

#[test]
fn false_in_a_blockable_range_is_reported_and_ignored() {
    struct No;
    impl IntervalOps for No {
        fn invalidate(&self, _s: &IntervalNotifier, _r: &Range, _c: u64) -> bool {
            false
        }
    }
    let mm = Subscriptions::new();
    let s = mm.interval_insert(0x1000, 0x1000, Arc::new(No)).unwrap();
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    assert_eq!(mm.diagnostics().count(Warning::BlockableStartFailed), 1);
    assert_eq!(mm.interval_active_ranges(), 0);
    s.remove().unwrap();
}

/// Exit sends one blockable RELEASE invalidation of everything; notifiers
/// stay in the tree until their owners remove them.
#[test]
fn exit_invalidates_everything_with_release_and_keeps_the_tree() {
    let mm = Subscriptions::new();
    let m = Mirror::new();
    let s = mm.interval_insert(0x7000_0000, 0x1000, m.clone()).unwrap();
    mm.release().unwrap();
    let calls = m.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0.event(), Event::Release);
    assert!(calls[0].0.blockable());
    assert_eq!(calls[0].0.start(), 0);
    assert!(s.is_in_tree());
    // exit_mmap's unmap of everything still reaches it (event UNMAP).
    mm.invalidate_range_start(Range::everything(Event::Unmap))
        .end();
    assert_eq!(m.calls().len(), 2);
    s.remove().unwrap();
}

/// A user that skips set_seq (no read protocol) still gets invalidations.
#[test]
fn users_without_the_read_protocol_need_no_set_seq() {
    let mm = Subscriptions::new();
    let m = Mirror::new();
    m.no_set_seq.store(true, Ordering::SeqCst);
    let s = mm.interval_insert(0x1000, 0x1000, m.clone()).unwrap();
    let seq = s.read_begin().unwrap();
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    assert_eq!(m.calls().len(), 1);
    assert!(!s.read_retry(seq), "no set_seq, no collision seen");
    s.remove().unwrap();
}

/// Interval mode enabled between a start and its end does not unbalance the
/// in-flight count: the end matches what the start did.
#[test]
fn interval_mode_enabled_mid_pair_does_not_underflow() {
    let mm = Subscriptions::new();
    let log = new_log();
    mm.register(Recorder::new("a", START_END, &log)).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
    // Another thread enables interval mode: this one is inside the pair's
    // read-side section, where registering is refused (see below).
    let mm2 = mm.clone();
    let s = std::thread::spawn(move || mm2.interval_insert(0x1000, 0x1000, Mirror::new()))
        .join()
        .unwrap()
        .unwrap();
    inv.end();
    assert_eq!(mm.interval_active_ranges(), 0);
    let seq = s.read_begin().unwrap();
    assert!(!s.read_retry(seq));
    s.remove().unwrap();
}

/// An invalidation holds its read-side section from start to end, so on
/// the thread running the pair, operations that take the mmap lock or wait
/// for a grace period are refused instead of deadlocking (Linux would block
/// on the mmap lock the primary holds around the pair).
#[test]
fn registering_inside_a_pair_on_the_same_thread_is_refused() {
    let mm = Subscriptions::new();
    let log = new_log();
    let h = mm.register(Recorder::new("a", START_END, &log)).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000));
    assert!(matches!(
        mm.interval_insert(0x1000, 0x1000, Mirror::new()),
        Err(Error::WouldDeadlock(_))
    ));
    assert!(matches!(
        mm.register(Recorder::new("b", START_END, &log)),
        Err(Error::WouldDeadlock(_))
    ));
    assert!(matches!(mm.unregister(&h), Err(Error::WouldDeadlock(_))));
    inv.end();
    mm.unregister(&h).unwrap();
}

/// ba170f76 for interval notifiers: a sleep inside a non-blockable
/// `invalidate` is reported, one inside a blockable one is not (debug
/// builds; found missing by cargo-mutants).
#[cfg(debug_assertions)]
#[test]
fn sleeping_in_a_non_blockable_interval_callback_is_reported() {
    struct Sleeper;
    impl IntervalOps for Sleeper {
        fn invalidate(&self, sub: &IntervalNotifier, _r: &Range, seq: u64) -> bool {
            mmu_notifier::might_sleep();
            sub.set_seq(seq);
            true
        }
    }
    let mm = Subscriptions::new();
    let s = mm
        .interval_insert(0x1000, 0x1000, Arc::new(Sleeper))
        .unwrap();
    mm.invalidate_range_start(range(0x1000, 0x2000)).end();
    assert_eq!(mm.diagnostics().count(Warning::SleepInNonBlockable), 0);
    mm.invalidate_range_start_nonblock(range(0x1000, 0x2000))
        .unwrap()
        .end();
    assert_eq!(mm.diagnostics().count(Warning::SleepInNonBlockable), 1);
    s.remove().unwrap();
}

/// Removing a notifier whose insert is still deferred drops exactly that
/// insert: the other deferred inserts still land in the tree at the end
/// (found missing by cargo-mutants).
#[test]
fn removing_a_deferred_insert_keeps_the_other_deferred_inserts() {
    let mm = Subscriptions::new();
    let s = mm.interval_insert(0x1000, 0x1000, Mirror::new()).unwrap();
    let inv = mm.invalidate_range_start(range(0x1000, 0x2000)); // seq odd
    let a = mm.interval_insert(0x5000, 0x1000, Mirror::new()).unwrap();
    let b = mm.interval_insert(0x7000, 0x1000, Mirror::new()).unwrap();
    assert!(!a.is_in_tree() && !b.is_in_tree(), "deferred while odd");
    a.remove().unwrap();
    inv.end();
    assert!(!a.is_in_tree(), "removed before its deferred insert ran");
    assert!(b.is_in_tree(), "the other deferred insert still happened");
    assert_eq!(mm.interval_count(), 2);
    b.remove().unwrap();
    s.remove().unwrap();
}
