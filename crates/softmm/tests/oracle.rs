//! The coherence oracle: it catches deliberately broken secondaries and
//! stays silent for a correct one, even under concurrency.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use softmm::{MapKind, Prot, ViolationKind};

#[test]
fn oracle_catches_a_secondary_that_ignores_invalidations() {
    let (phys, mm) = machine(64);
    let dev = MiniDevice::new(&mm, true, false);
    let a = populated(&mm, 1, 1);
    dev.fault(a, true, &mut || {}).unwrap();
    assert!(dev.access(a, true).unwrap());
    // The primary unmaps (and frees the frame).
    mm.munmap(a, P).unwrap();
    let v = dev.access(a, false).unwrap_err();
    assert_eq!(v.kind, ViolationKind::NotMapped);
    assert!(v.trace.iter().any(|t| t.op == softmm::Op::Munmap), "{v}");
    // The next mapping gets the same address and the same (reused) frame:
    // the stale handle is caught by its generation.
    let b = populated(&mm, 1, 2);
    assert_eq!(b, a);
    let v = dev.access(a, false).unwrap_err();
    assert!(
        matches!(v.kind, ViolationKind::FrameFreed { current_gen: 1 }),
        "{v}"
    );
    assert_eq!(phys.oracle().violation_count(), 2);
    assert_eq!(phys.oracle().violations().len(), 2);
}

#[test]
fn oracle_catches_a_secondary_that_skips_read_retry() {
    for broken in [false, true] {
        let (phys, mm) = machine(64);
        let dev = MiniDevice::new(&mm, false, broken);
        let a = mm.mmap(P, Prot::RW, MapKind::AnonPrivate).unwrap();
        mm.write(a, &[1]).unwrap();
        let child = mm.fork().unwrap(); // the page is now COW-shared
                                        // Read-fault it into the device; between range_fault and the device
                                        // lock the CPU writes, breaking COW (CLEAR on the page).
        let mm2 = mm.clone();
        dev.fault(a, false, &mut || mm2.write(a, &[9]).unwrap())
            .unwrap();
        let r = dev.access(a, false);
        if broken {
            let v = r.unwrap_err();
            assert!(matches!(v.kind, ViolationKind::WrongFrame { .. }), "{v}");
            assert_eq!(phys.oracle().violation_count(), 1);
        } else {
            assert!(r.unwrap(), "retried and got the new frame");
            assert_eq!(phys.oracle().violation_count(), 0);
        }
        drop(child);
    }
}

#[test]
fn oracle_catches_use_of_an_unpinned_registration() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 0);
    let pin = mm.pin(a, 2, false).unwrap();
    phys.oracle().check_pinned(&pin, a + P, false).unwrap();
    assert_eq!(
        phys.oracle()
            .check_pinned(&pin, a + P, true)
            .unwrap_err()
            .kind,
        ViolationKind::NotPinned
    );
    // After munmap the pin still holds the frames (the registration is stale
    // with respect to the address space, but the memory is safe).
    mm.munmap(a, 2 * P).unwrap();
    phys.oracle().check_pinned(&pin, a, false).unwrap();
    assert!(phys
        .oracle()
        .check_access(&mm, a, pin.frames()[0], false)
        .is_err());
    pin.unpin().unwrap();
    assert!(phys.oracle().check_pinned(&pin, a, false).is_err());
}

#[test]
fn oracle_catches_a_write_through_a_read_only_translation() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 1, 0);
    let f = frame_at(&mm, a);
    mm.mprotect(a, P, Prot::READ).unwrap();
    phys.oracle().check_access(&mm, a, f, false).unwrap();
    assert_eq!(
        phys.oracle()
            .check_access(&mm, a, f, true)
            .unwrap_err()
            .kind,
        ViolationKind::Permission
    );
}

/// A correct mirror under concurrent primary operations: no violation.
#[test]
fn correct_mirror_under_concurrent_primary_operations_has_no_violations() {
    let (phys, mm) = machine(512);
    let dev = MiniDevice::new(&mm, false, false);
    let a = mm.mmap(16 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let primary = {
        let mm = mm.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pg = a + (i % 16) * P;
                match i % 7 {
                    0 => mm.madvise_dontneed(pg, P).unwrap(),
                    1 => {
                        mm.swap_out(pg, P).unwrap();
                    }
                    2 => {
                        mm.migrate_pages(pg, P).unwrap();
                    }
                    3 => {
                        mm.age(a, 16 * P).unwrap();
                    }
                    4 => {
                        let c = mm.fork().unwrap();
                        mm.write(pg, &[i as u8]).unwrap();
                        drop(c);
                    }
                    5 => {
                        mm.mprotect(pg, P, Prot::READ).unwrap();
                        mm.mprotect(pg, P, Prot::RW).unwrap();
                    }
                    _ => mm.write(pg, &[i as u8]).unwrap(),
                }
                i += 1;
                progress.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut accesses = 0;
    let mut i = 0u64;
    // Both sides make progress: at least 3000 device faults and 2000
    // primary operations overlap.
    while i < 3000 || progress.load(Ordering::Relaxed) < 2000 {
        i += 1;
        let pg = a + (i * 7 % 16) * P;
        let write = i % 3 == 0;
        if dev.fault(pg, write, &mut || {}).is_ok() && dev.access(pg, write).unwrap() {
            accesses += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    primary.join().unwrap();
    assert!(accesses > 0);
    assert_eq!(
        phys.oracle().violation_count(),
        0,
        "{:?}",
        phys.oracle().violations().first().map(|v| v.to_string())
    );
}
