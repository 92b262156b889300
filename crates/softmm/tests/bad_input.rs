//! Bad input from callers of `Mm`: clear errors, no panic, no change.

mod common;

use common::*;
use mmu_notifier::Owner;
use softmm::{Error, MapKind, Prot, SharedObject, TASK_SIZE};

#[test]
fn unaligned_empty_and_overflowing_ranges_are_rejected_without_changes() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 1);
    let before = (mm.vmas().len(), mm.ptes());
    let bad = [
        (a + 1, P),
        (a, 0),
        (a, P + 1),
        (u64::MAX - P + 1, 2 * P),
        (TASK_SIZE - P, 2 * P),
    ];
    for (addr, len) in bad {
        assert!(
            matches!(mm.munmap(addr, len), Err(Error::InvalidRange { .. })),
            "munmap {addr:#x} {len:#x}"
        );
        assert!(matches!(
            mm.mprotect(addr, len, Prot::READ),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.madvise_dontneed(addr, len),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.madvise_free(addr, len),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.mmap_fixed(addr, len, Prot::RW, MapKind::AnonPrivate),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.swap_out(addr, len),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.migrate_pages(addr, len),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.migrate_to_device(addr, len, Owner(1)),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.make_device_exclusive(addr, len, None),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(mm.age(addr, len), Err(Error::InvalidRange { .. })));
        assert!(matches!(
            mm.writeback(addr, len),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            mm.mremap(addr, len, len, true),
            Err(Error::InvalidRange { .. })
        ));
    }
    assert!(matches!(
        mm.mmap(0, Prot::RW, MapKind::AnonPrivate),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        mm.mmap(TASK_SIZE, Prot::RW, MapKind::AnonPrivate),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        mm.pin(a, u64::MAX, false),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        mm.read(u64::MAX, &mut [0u8; 2]),
        Err(Error::InvalidRange { .. })
    ));
    assert_eq!(before, (mm.vmas().len(), mm.ptes()));
}

#[test]
fn operations_on_unmapped_ranges() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 1, 1);
    let hole = a + 16 * P;
    assert!(matches!(
        mm.read(hole, &mut [0u8]),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        mm.write(hole, &[0u8]),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        mm.fault(hole, false),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        mm.mprotect(a, 2 * P, Prot::READ),
        Err(Error::NotMapped { .. })
    ));
    assert!(mm.pte(a).unwrap().write, "failed mprotect changed nothing");
    assert!(matches!(
        mm.madvise_dontneed(a, 2 * P),
        Err(Error::NotMapped { .. })
    ));
    assert_eq!(byte(&mm, a), 1);
    assert!(matches!(
        mm.mremap(hole, P, 2 * P, true),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        mm.mremap(a, 2 * P, 3 * P, true),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        mm.migrate_to_device(hole, P, Owner(1)),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        mm.pin(hole, 1, false),
        Err(Error::NotMapped { .. })
    ));
    // Overlapping fixed mremap target.
    assert!(matches!(
        mm.mremap_fixed(a, P, P, a),
        Err(Error::InvalidRange { .. })
    ));
    // munmap of nothing, swap-out of nothing, aging of nothing: fine, no-ops.
    mm.munmap(hole, P).unwrap();
    assert_eq!(mm.swap_out(hole, P).unwrap(), 0);
    assert_eq!(mm.age(hole, P).unwrap(), 0);
}

#[test]
fn protection_and_file_bounds() {
    let (phys, mm) = machine(64);
    let none = mm.mmap(P, Prot::NONE, MapKind::AnonPrivate).unwrap();
    assert!(matches!(
        mm.read(none, &mut [0u8]),
        Err(Error::Protection { access: "read", .. })
    ));
    let ro = mm.mmap(P, Prot::READ, MapKind::AnonPrivate).unwrap();
    assert_eq!(byte(&mm, ro), 0);
    assert!(matches!(
        mm.write(ro, &[1]),
        Err(Error::Protection {
            access: "write",
            ..
        })
    ));
    assert!(matches!(mm.pin(ro, 1, true), Err(Error::Protection { .. })));
    let file = SharedObject::new_file(&phys, 1, b"x").unwrap();
    let f = mm
        .mmap(2 * P, Prot::READ, MapKind::File { file, pgoff: 0 })
        .unwrap();
    assert_eq!(byte(&mm, f), b'x');
    assert!(
        matches!(mm.read(f + P, &mut [0u8]), Err(Error::NotMapped { .. })),
        "beyond EOF"
    );
}

#[test]
fn out_of_memory_is_an_error_and_leaves_accounting_intact() {
    let (phys, mm) = machine(4); // zero page + 3 frames
    let a = mm.mmap(8 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    for i in 0..3 {
        mm.write(a + i * P, &[1]).unwrap();
    }
    assert_eq!(mm.write(a + 3 * P, &[1]), Err(Error::OutOfMemory));
    assert!(mm.pte(a + 3 * P).is_none());
    // COW of a shared page with no frame left also fails cleanly.
    let child = mm.fork().unwrap();
    assert_eq!(child.write(a, &[2]), Err(Error::OutOfMemory));
    assert_eq!(byte(&child, a), 1);
    drop(child);
    mm.munmap(a, 8 * P).unwrap();
    assert_eq!(phys.stats().in_use, 1);
    assert_eq!(phys.stats().underflows, 0);
}

#[test]
fn stale_frame_handles_and_double_unpin() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 1, 1);
    let f = frame_at(&mm, a);
    mm.munmap(a, P).unwrap();
    assert!(matches!(
        phys.read_frame(f, 0, &mut [0u8]),
        Err(Error::StaleFrame { .. })
    ));
    assert!(matches!(
        phys.write_frame(f, 0, &[0u8]),
        Err(Error::StaleFrame { .. })
    ));
    let g = phys.alloc_frame().unwrap();
    assert!(matches!(
        phys.read_frame(g, 4090, &mut [0u8; 8]),
        Err(Error::InvalidRange { .. })
    ));
    phys.put_frame(g.pfn);
    phys.put_frame(g.pfn); // double free: counted, not corrupting
    assert_eq!(phys.stats().underflows, 1);
    let b = populated(&mm, 1, 1);
    let pin = mm.pin(b, 1, false).unwrap();
    pin.unpin().unwrap();
    assert_eq!(pin.unpin(), Err(Error::AlreadyUnpinned));
}

#[test]
fn exited_address_space_refuses_users_and_ranges_of_others_are_refused() {
    let (phys, mm) = machine(64);
    let other = softmm::Mm::new(&phys);
    let a = populated(&mm, 1, 1);
    let isub = mm
        .subscriptions()
        .interval_insert(a, P, std::sync::Arc::new(IRec { log: Log::new(&mm) }))
        .unwrap();
    let seq = isub.read_begin().unwrap();
    let mut range = softmm::HmmRange::new(&isub, seq, a, a + P);
    // The walk is a method of the lock, so it walks the lock's address
    // space; a range whose notifier is another's is refused.
    let g = other.mmap_read();
    assert!(matches!(
        g.range_fault(&mut range),
        Err(Error::ForeignNotifier)
    ));
    drop(g);
    let mut empty = softmm::HmmRange::new(&isub, seq, a, a);
    let g = mm.mmap_read();
    assert!(matches!(
        g.range_fault(&mut empty),
        Err(Error::InvalidRange { .. })
    ));
    drop(g);
    let grab = mm.grab();
    drop(mm);
    assert!(grab.is_exited());
    assert!(matches!(grab.get(), Err(Error::Exited)));
    // Registering on an exited address space fails with the subsystem's error.
    assert!(grab
        .subscriptions()
        .interval_insert(
            a,
            P,
            std::sync::Arc::new(IRec {
                log: Log::default().into()
            })
        )
        .is_err());
    isub.remove().unwrap();
}
