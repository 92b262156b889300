//! Misuse gets a clear error or diagnostic: never UB, a deadlock or lost state.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use mmu_notifier::{
    srcu, Again, Callbacks, Error, Event, MmuNotifier, Range, RangeError, Subscriptions,
    SubscriptionsRef, Warning, END_OF_ADDRESS_SPACE,
};

#[test]
fn invalid_ranges_are_rejected() {
    assert!(matches!(
        Range::new(0x2000, 0x2000, Event::Unmap),
        Err(RangeError::Empty { .. })
    ));
    assert!(matches!(
        Range::new(0x3000, 0x2000, Event::Unmap),
        Err(RangeError::Empty { .. })
    ));
    assert!(matches!(
        Range::new(0x1001, 0x2000, Event::Unmap),
        Err(RangeError::Unaligned { .. })
    ));
    assert!(matches!(
        Range::new(0x1000, 0x2001, Event::Unmap),
        Err(RangeError::Unaligned { .. })
    ));
    assert!(matches!(
        Range::from_len(u64::MAX - 0xfff, 0x2000, Event::Unmap),
        Err(RangeError::Overflow { .. })
    ));
    assert!(matches!(
        Range::with_owner(0, 0x1000, Event::Clear, Some(mmu_notifier::Owner(1))),
        Err(RangeError::OwnerNotAllowed(Event::Clear))
    ));
    let all = Range::new(0, END_OF_ADDRESS_SPACE, Event::Unmap).unwrap();
    assert_eq!(all, Range::everything(Event::Unmap));
    let e: Error = RangeError::Empty { start: 1, end: 0 }.into();
    assert!(e.to_string().contains("invalid range"));
}

#[test]
fn unregister_twice_is_an_error() {
    let mm = Subscriptions::new();
    let log = new_log();
    let h = mm.register(Recorder::new("a", START_END, &log)).unwrap();
    mm.unregister(&h).unwrap();
    assert!(!h.is_registered());
    assert!(matches!(mm.unregister(&h), Err(Error::NotRegistered)));
    assert!(matches!(mm.put(&h), Err(Error::PutUnderflow)));
}

#[test]
fn put_below_zero_is_an_error_and_a_warning() {
    let mm = Subscriptions::new();
    let log = new_log();
    let h = mm.register(Recorder::new("a", START_END, &log)).unwrap();
    mm.put(&h).unwrap(); // register + put is a valid pairing (ARM SMMU SVA)
    assert!(matches!(mm.put(&h), Err(Error::PutUnderflow)));
    assert_eq!(mm.diagnostics().count(Warning::PutUnderflow), 1);
    assert_eq!(mm.notifier_count(), 0);
    mmu_notifier::synchronize().unwrap();
}

#[test]
fn registering_on_an_exited_address_space_fails() {
    let mm = Subscriptions::new();
    mm.release().unwrap();
    let log = new_log();
    assert!(matches!(
        mm.register(Recorder::new("a", START_END, &log)),
        Err(Error::AddressSpaceExited)
    ));
    assert!(matches!(mm.release(), Err(Error::AlreadyReleased)));
}

/// A handle of another address space is refused. A lock guard cannot be
/// mixed up at all: the registrations made under the lock are methods of
/// the guard, so they go to the guard's own address space.
#[test]
fn handles_of_another_address_space_are_refused_and_guards_register_in_their_own() {
    let (mm, other) = (Subscriptions::new(), Subscriptions::new());
    let log = new_log();
    let h = mm.register(Recorder::new("a", START_END, &log)).unwrap();
    assert!(matches!(
        other.unregister(&h),
        Err(Error::WrongAddressSpace)
    ));
    let g = other.mmap_write();
    let h2 = g.register(Recorder::new("b", START_END, &log)).unwrap();
    assert!(std::ptr::eq(g.subscriptions(), &*other));
    drop(g);
    assert_eq!((mm.notifier_count(), other.notifier_count()), (1, 1));
    other.unregister(&h2).unwrap();
    mm.unregister(&h).unwrap();
}

/// Waiting for a grace period from a callback would deadlock: refused.
#[test]
fn unregister_and_synchronize_from_a_callback_are_refused() {
    struct SelfUnregister {
        // The primary's handle: the callback tries `release` too.
        mm: Arc<Subscriptions>,
        handle: std::sync::OnceLock<mmu_notifier::NotifierHandle>,
        errors: std::sync::Mutex<Vec<String>>,
    }
    impl MmuNotifier for SelfUnregister {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            let mut errs = self.errors.lock().unwrap();
            errs.push(
                self.mm
                    .unregister(self.handle.get().unwrap())
                    .unwrap_err()
                    .to_string(),
            );
            errs.push(mmu_notifier::synchronize().unwrap_err().to_string());
            errs.push(srcu::synchronize().unwrap_err().to_string());
            errs.push(self.mm.release().unwrap_err().to_string());
            let log = new_log();
            errs.push(
                self.mm
                    .register(Recorder::new("x", START_END, &log))
                    .unwrap_err()
                    .to_string(),
            );
            Ok(())
        }
    }
    let mm = Arc::new(Subscriptions::new());
    let n = Arc::new(SelfUnregister {
        mm: mm.clone(),
        handle: Default::default(),
        errors: Default::default(),
    });
    n.handle.set(mm.register(n.clone()).unwrap()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    let errs = n.errors.lock().unwrap().clone();
    assert_eq!(errs.len(), 5);
    assert!(
        errs.iter().all(|e| e.contains("would deadlock")),
        "{errs:?}"
    );
    mm.unregister(n.handle.get().unwrap()).unwrap();
}

/// A panicking callback is caught and reported; the other notifiers still
/// get their callbacks and the address space stays usable.
#[test]
fn panicking_callback_is_reported_and_contained() {
    struct Panics(AtomicUsize);
    impl MmuNotifier for Panics {
        fn callbacks(&self) -> Callbacks {
            START_END | Callbacks::RELEASE
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("driver bug in start");
        }
        fn invalidate_range_end(&self, _r: &Range) {
            panic!("driver bug in end");
        }
        fn release(&self) {
            panic!("driver bug in release");
        }
    }
    let mm = Subscriptions::new();
    let log = new_log();
    let before = Recorder::new("before", START_END | Callbacks::RELEASE, &log);
    mm.register(before.clone()).unwrap();
    let p = Arc::new(Panics(AtomicUsize::new(0)));
    mm.register(p.clone()).unwrap();
    let after = Recorder::new("after", START_END | Callbacks::RELEASE, &log);
    mm.register(after.clone()).unwrap();
    for _ in 0..3 {
        mm.invalidate_range_start(range(0, 0x1000)).end();
    }
    assert_eq!(p.0.load(Ordering::SeqCst), 3);
    assert_eq!(before.calls().len(), 6);
    assert_eq!(after.calls().len(), 6);
    assert_eq!(mm.diagnostics().count(Warning::CallbackPanicked), 6);
    mm.release().unwrap();
    assert_eq!(mm.diagnostics().count(Warning::CallbackPanicked), 7);
    assert_eq!(before.releases.load(Ordering::SeqCst), 1);
    assert_eq!(after.releases.load(Ordering::SeqCst), 1);
}

/// The walk of a list with one notifier takes its own path (no resume
/// state): a panic there is contained and reported too, and the address
/// space stays usable.
#[test]
fn panicking_only_notifier_is_reported_and_contained() {
    struct PanicsOnce(AtomicUsize);
    impl MmuNotifier for PanicsOnce {
        fn callbacks(&self) -> Callbacks {
            START_END
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("driver bug in start");
            }
            Ok(())
        }
        fn invalidate_range_end(&self, _r: &Range) {
            if self.0.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("driver bug in end");
            }
        }
    }
    let mm = Subscriptions::new();
    let p = Arc::new(PanicsOnce(AtomicUsize::new(0)));
    let h = mm.register(p.clone()).unwrap();
    mm.invalidate_range_start(range(0, 0x1000)).end();
    assert_eq!(mm.diagnostics().count(Warning::CallbackPanicked), 2);
    let mut r = range(0, 0x1000);
    mm.invalidate_range_start_in(&mut r).end();
    assert_eq!(p.0.load(Ordering::SeqCst), 4);
    assert_eq!(mm.diagnostics().count(Warning::CallbackPanicked), 2);
    mm.unregister(&h).unwrap();
}

/// alloc_notifier failing is passed up by get and changes nothing.
#[test]
fn get_passes_alloc_failure_up() {
    struct NoMem;
    impl mmu_notifier::NotifierAlloc for NoMem {
        fn alloc_notifier(
            &self,
            _mm: &SubscriptionsRef,
        ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
            Err("out of memory".into())
        }
    }
    let mm = Subscriptions::new();
    let ops: Arc<dyn mmu_notifier::NotifierAlloc> = Arc::new(NoMem);
    let e = mm.get(&ops).unwrap_err();
    assert!(matches!(e, Error::Alloc(_)) && e.to_string().contains("out of memory"));
    assert_eq!(mm.notifier_count(), 0);
}

/// get on an exited address space: the fresh notifier is freed synchronously.
#[test]
fn get_on_exited_address_space_frees_the_new_notifier() {
    struct Ops(AtomicUsize);
    impl mmu_notifier::NotifierAlloc for Ops {
        fn alloc_notifier(
            &self,
            _mm: &SubscriptionsRef,
        ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
            Ok(Recorder::new("x", START_END, &new_log()))
        }
        fn free_notifier(&self, _n: Arc<dyn MmuNotifier>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let mm = Subscriptions::new();
    mm.release().unwrap();
    let ops = Arc::new(Ops(AtomicUsize::new(0)));
    let dyn_ops: Arc<dyn mmu_notifier::NotifierAlloc> = ops.clone();
    assert!(matches!(mm.get(&dyn_ops), Err(Error::AddressSpaceExited)));
    assert_eq!(ops.0.load(Ordering::SeqCst), 1);
}

// Gaps found by cargo-mutants in the small value types.

#[test]
fn range_last_and_overlaps_are_inclusive_at_the_right_places() {
    use mmu_notifier::Event;
    let r = Range::new(0x2000, 0x4000, Event::Clear).unwrap();
    assert_eq!(r.last(), 0x3fff);
    assert!(r.overlaps(0x3fff, 0x5000), "touches the last byte");
    assert!(r.overlaps(0x0, 0x2000), "touches the first byte");
    assert!(r.overlaps(0x2800, 0x2900), "inside");
    assert!(!r.overlaps(0x4000, 0x5000), "starts at end (exclusive)");
    assert!(!r.overlaps(0x0, 0x1fff), "ends just before start");
}

#[test]
fn callbacks_flags_are_distinct_bits() {
    let all = [
        Callbacks::RELEASE,
        Callbacks::CLEAR_FLUSH_YOUNG,
        Callbacks::CLEAR_YOUNG,
        Callbacks::TEST_YOUNG,
        Callbacks::CHANGE_PTE,
        Callbacks::INVALIDATE_RANGE_START,
        Callbacks::INVALIDATE_RANGE_END,
        Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS,
        Callbacks::START_MAY_FAIL,
    ];
    for (i, a) in all.iter().enumerate() {
        assert_ne!(*a, Callbacks::NONE);
        for (j, b) in all.iter().enumerate() {
            assert_eq!(a.contains(*b), i == j, "{a:?} vs {b:?}");
        }
    }
    let both = Callbacks::RELEASE | Callbacks::CHANGE_PTE;
    assert!(both.contains(Callbacks::RELEASE) && both.contains(Callbacks::CHANGE_PTE));
    assert_eq!(both | Callbacks::RELEASE, both, "union, not xor");
}

#[test]
fn diagnostics_count_each_warning_separately() {
    use mmu_notifier::Warning;
    let mm = Subscriptions::new();
    // One PutUnderflow-free way to get two different warnings: a start that
    // fails undeclared in a blockable range reports both kinds below.
    struct Fails;
    impl MmuNotifier for Fails {
        fn callbacks(&self) -> Callbacks {
            Callbacks::INVALIDATE_RANGE_START
        }
        fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
            Err(Again)
        }
    }
    mm.register(Arc::new(Fails)).unwrap();
    mm.invalidate_range_start(Range::new(0, 0x1000, mmu_notifier::Event::Clear).unwrap())
        .end();
    let d = mm.diagnostics();
    assert_eq!(d.count(Warning::BlockableStartFailed), 1);
    assert_eq!(d.count(Warning::UndeclaredStartFailure), 1);
    assert_eq!(d.count(Warning::Recursion), 0);
    assert_eq!(d.total(), 2);
}
