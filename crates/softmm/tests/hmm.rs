//! The secondary-side entry points: range_fault (the HMM fault path) and pin.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use mmu_notifier::{IntervalNotifier, Owner};
use softmm::{DevicePagemap, Error, FrameRef, HmmRange, MapKind, Mm, Prot};

fn walk(
    mm: &Mm,
    sub: &IntervalNotifier,
    start: u64,
    n: u64,
    fault: bool,
    write: bool,
    owner: Option<Owner>,
) -> Result<Vec<softmm::HmmPfn>, Error> {
    let seq = sub.read_begin().unwrap();
    let mut r = HmmRange::new(sub, seq, start, start + n * P);
    r.fault = fault;
    r.write = write;
    r.dev_private_owner = owner;
    let g = mm.mmap_read();
    g.range_fault(&mut r)?;
    Ok(r.pfns)
}

#[test]
fn snapshot_without_faulting_reports_error_none_zero_read_write() {
    let (_phys, mm) = machine(64);
    let a = mm
        .mmap_fixed(softmm::MMAP_BASE, 5 * P, Prot::RW, MapKind::AnonPrivate)
        .unwrap();
    mm.mprotect(a, P, Prot::NONE).unwrap(); // page 0: PROT_NONE
    mm.munmap(a + P, P).unwrap(); // page 1: hole
    let _ = byte(&mm, a + 2 * P); // page 2: zero page
    mm.write(a + 3 * P, &[1]).unwrap();
    mm.mprotect(a + 3 * P, P, Prot::READ).unwrap(); // page 3: read-only data
    mm.write(a + 4 * P, &[1]).unwrap(); // page 4: writable
    let log = Log::new(&mm);
    let sub = irec(&mm, &log, a, 6 * P);
    let pfns = walk(&mm, &sub, a, 6, false, false, None).unwrap();
    assert!(pfns[0].error && pfns[1].error);
    assert!(pfns[2].valid && pfns[2].zero && !pfns[2].write);
    assert!(pfns[3].valid && !pfns[3].write);
    assert!(pfns[4].valid && pfns[4].write);
    assert_eq!(
        pfns[5],
        softmm::HmmPfn {
            error: true,
            ..Default::default()
        }
    );
    sub.remove().unwrap();
}

#[test]
fn faulting_errors_match_hmm() {
    let (_phys, mm) = machine(64);
    let ro = mm.mmap(2 * P, Prot::READ, MapKind::AnonPrivate).unwrap();
    let none = mm.mmap(P, Prot::NONE, MapKind::AnonPrivate).unwrap();
    let log = Log::new(&mm);
    let sub = irec(&mm, &log, 0, softmm::TASK_SIZE);
    // -EPERM: write request on a read-only VMA.
    assert!(matches!(
        walk(&mm, &sub, ro, 2, true, true, None),
        Err(Error::Protection {
            access: "write",
            ..
        })
    ));
    // -EFAULT: unreadable VMA or no VMA with a fault requested.
    assert!(matches!(
        walk(&mm, &sub, none, 1, true, false, None),
        Err(Error::Protection { access: "read", .. })
    ));
    assert!(matches!(
        walk(&mm, &sub, none + 64 * P, 1, true, false, None),
        Err(Error::NotMapped { .. })
    ));
    // Read fault of untouched memory maps the zero page.
    let p = walk(&mm, &sub, ro, 2, true, false, None).unwrap();
    assert!(p.iter().all(|x| x.valid && x.zero));
    sub.remove().unwrap();
}

#[test]
fn a_fault_inside_the_walk_is_seen_as_a_collision() {
    let (_phys, mm) = machine(64);
    let a = mm.mmap(2 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let _ = byte(&mm, a); // zero page: a write fault must COW (CLEAR)
    let log = Log::new(&mm);
    let sub = irec(&mm, &log, a, 2 * P);
    assert_eq!(walk(&mm, &sub, a, 2, true, true, None), Err(Error::Busy));
    // The retry with a fresh sequence succeeds.
    let p = walk(&mm, &sub, a, 2, true, true, None).unwrap();
    assert!(p.iter().all(|x| x.valid && x.write));
    sub.remove().unwrap();
}

struct Driver(Mutex<Vec<(u64, FrameRef)>>);
impl DevicePagemap for Driver {
    fn migrating_to_ram(&self, _mm: u64, addr: u64, frame: FrameRef) {
        self.0.lock().unwrap().push((addr, frame));
    }
}

#[test]
fn device_private_pages_of_the_owner_are_reported_others_are_faulted_back() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 70);
    let (mine, theirs) = (Owner(1), Owner(2));
    let driver = Arc::new(Driver(Mutex::new(Vec::new())));
    phys.register_pagemap(theirs, driver.clone());
    let moved = mm.migrate_to_device(a, P, mine).unwrap();
    mm.migrate_to_device(a + P, P, theirs).unwrap();
    let log = Log::new(&mm);
    let sub = irec(&mm, &log, a, 2 * P);
    // Not faulting: the other device's page reads as "not present" (0).
    let p = walk(&mm, &sub, a, 2, false, false, Some(mine)).unwrap();
    assert_eq!(
        (p[0].valid, p[0].device, p[0].frame),
        (true, Some(mine), Some(moved[0].frame))
    );
    assert_eq!(p[1], softmm::HmmPfn::default());
    // Faulting: the other device's page migrates back (its driver is told).
    let _ = walk(&mm, &sub, a, 2, true, false, Some(mine));
    let p = walk(&mm, &sub, a, 2, true, false, Some(mine)).unwrap();
    assert!(p[1].valid && p[1].device.is_none());
    assert_eq!(driver.0.lock().unwrap().len(), 1);
    assert_eq!(byte(&mm, a + P), 71);
    assert_eq!(byte(&mm, a), 70);
    sub.remove().unwrap();
}

#[test]
fn pinned_frames_survive_munmap_and_cow() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 80);
    let child = mm.fork().unwrap();
    // A write pin after fork breaks COW first: the pin is the parent's own.
    let pin = mm.pin(a, 2, true).unwrap();
    assert_eq!(pin.frames()[0], frame_at(&mm, a));
    assert_ne!(frame_at(&child, a), pin.frames()[0]);
    phys.write_frame(pin.frames()[0], 0, &[1]).unwrap(); // DMA
    assert_eq!(byte(&mm, a), 1);
    assert_eq!(byte(&child, a), 80);
    // A second fork copies pinned pages for the child at once.
    let child2 = mm.fork().unwrap();
    assert_ne!(frame_at(&child2, a), pin.frames()[0]);
    assert!(
        mm.pte(a).unwrap().write,
        "the parent keeps its writable pinned page"
    );
    mm.munmap(a, 2 * P).unwrap();
    assert!(pin.frames().iter().all(|f| phys.is_current(*f)));
    pin.unpin().unwrap();
    assert!(pin.frames().iter().all(|f| !phys.is_current(*f)));
}

/// Several drivers of one owner (several opens of one device): each is told
/// of the owner's pages going back to RAM, and unregistering one leaves the
/// others registered.
#[test]
fn unregistering_one_of_an_owners_drivers_keeps_the_others() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 1, 71);
    let owner = Owner(9);
    let first = Arc::new(Driver(Mutex::new(Vec::new())));
    let second = Arc::new(Driver(Mutex::new(Vec::new())));
    let (first_dyn, second_dyn): (Arc<dyn DevicePagemap>, Arc<dyn DevicePagemap>) =
        (first.clone(), second.clone());
    phys.register_pagemap(owner, first_dyn.clone());
    phys.register_pagemap(owner, second_dyn.clone());
    mm.migrate_to_device(a, P, owner).unwrap();
    phys.unregister_pagemap(owner, &second_dyn);
    mm.migrate_to_ram(a, P, owner).unwrap();
    assert_eq!(
        first.0.lock().unwrap().len(),
        1,
        "the remaining driver was told"
    );
    assert!(
        second.0.lock().unwrap().is_empty(),
        "the removed one was not"
    );
    phys.unregister_pagemap(owner, &first_dyn);
}
