//! One test per row of the call-site table ("where core mm fires the hooks",
//! in the README):
//! hook, event, owner, range, and order relative to PTE changes and frees.

mod common;

use common::*;
use mmu_notifier::{Event, Owner, END_OF_ADDRESS_SPACE};
use softmm::{Error, MapKind, Mm, Prot, PteKind, SharedObject, GATHER_BATCH, PMD_SIZE, PUD_SIZE};

#[test]
fn munmap_one_unmap_pair_over_the_whole_range_frames_freed_after_start() {
    let (phys, mm) = machine(128);
    let a = populated(&mm, 4, 1);
    // A hole between two VMAs: the pair still spans the whole munmap range.
    mm.munmap(a + P, P).unwrap();
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let isub = irec(&mm, &log, a + 2 * P, P);
    let frames = [
        frame_at(&mm, a),
        frame_at(&mm, a + 2 * P),
        frame_at(&mm, a + 3 * P),
    ];
    log.watch(&frames);
    mm.munmap(a, 4 * P).unwrap();
    let calls = log.take();
    assert_eq!(starts(&calls), vec![(a, a + 4 * P, Event::Unmap, None)]);
    assert_eq!(intervals(&calls), vec![(a, a + 4 * P, Event::Unmap, None)]);
    assert_pairs_nested(&calls);
    // Every interval notifier and the list notifier ran while the frames
    // were still allocated; afterwards all three are free.
    assert!(log.alive_at_invalidate.lock().unwrap().iter().all(|&x| x));
    assert!(frames.iter().all(|f| !phys.is_current(*f)));
    assert!(mm.ptes().is_empty());
    // Unmapping nothing sends nothing.
    mm.munmap(a, 4 * P).unwrap();
    assert!(log.take().is_empty());
    isub.remove().unwrap();
}

#[test]
fn munmap_full_gather_batches_are_freed_before_end() {
    let (phys, mm) = machine(256);
    let n = GATHER_BATCH as u64 * 2 + 3;
    let a = populated(&mm, n, 0);
    let first = frame_at(&mm, a);
    let log = Log::new(&mm);
    // The end callback looks at the first frame: with Linux's mmu_gather it
    // may already be free (a full batch is flushed and freed in the pair).
    struct EndProbe(
        std::sync::Arc<softmm::PhysMem>,
        softmm::FrameRef,
        std::sync::Mutex<Option<bool>>,
    );
    impl mmu_notifier::MmuNotifier for EndProbe {
        fn callbacks(&self) -> mmu_notifier::Callbacks {
            mmu_notifier::Callbacks::INVALIDATE_RANGE_END
        }
        fn invalidate_range_end(&self, _r: &mmu_notifier::Range) {
            *self.2.lock().unwrap() = Some(self.0.is_current(self.1));
        }
    }
    let probe = std::sync::Arc::new(EndProbe(phys.clone(), first, Default::default()));
    mm.subscriptions().register(probe.clone()).unwrap();
    TlbRec::register(&mm, &log);
    mm.munmap(a, n * P).unwrap();
    assert_eq!(
        *probe.2.lock().unwrap(),
        Some(false),
        "first batch freed inside the pair"
    );
    // Each batch is flushed (secondary TLBs) before it is freed.
    let tlbs = log
        .take()
        .iter()
        .filter(|c| matches!(c, Call::Tlb(..)))
        .count();
    assert_eq!(tlbs, 3);
}

#[test]
fn exit_release_first_then_unmap_everything() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 5);
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let isub = irec(&mm, &log, a, 2 * P);
    let frames = [frame_at(&mm, a), frame_at(&mm, a + P)];
    log.watch(&frames);
    let before = phys.stats().in_use;
    assert!(mm.exit());
    let calls = log.take();
    // Interval RELEASE first, then the list release, then the UNMAP of
    // everything, which only the interval notifier still sees.
    assert_eq!(
        calls,
        vec![
            Call::Interval(mmu_notifier::Range::everything(Event::Release)),
            Call::Release,
            Call::Interval(
                mmu_notifier::Range::new(0, END_OF_ADDRESS_SPACE, Event::Unmap).unwrap()
            ),
        ]
    );
    assert!(log.alive_at_invalidate.lock().unwrap().iter().all(|&x| x));
    assert_eq!(phys.stats().in_use, before - 2);
    isub.remove().unwrap();
}

#[test]
fn mremap_move_unmap_of_old_range_keeps_frames() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 3, 10);
    // Something right after, so growing must move.
    let _block = mm
        .mmap_fixed(a + 3 * P, P, Prot::RW, MapKind::AnonPrivate)
        .unwrap();
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let frames: Vec<_> = (0..3).map(|i| frame_at(&mm, a + i * P)).collect();
    let b = mm.mremap(a, 3 * P, 5 * P, true).unwrap();
    assert_ne!(a, b);
    let calls = log.take();
    // move_page_tables' pair, then the munmap of the (now empty) old range.
    assert_eq!(
        starts(&calls),
        vec![
            (a, a + 3 * P, Event::Unmap, None),
            (a, a + 3 * P, Event::Unmap, None)
        ]
    );
    assert_pairs_nested(&calls);
    for i in 0..3 {
        assert_eq!(frame_at(&mm, b + i * P), frames[i as usize]);
        assert_eq!(byte(&mm, b + i * P), 10 + i as u8);
    }
    assert!(frames.iter().all(|f| phys.is_current(*f)));
    assert!(mm.pte(a).is_none());
    // Growing in place changes no PTE and sends nothing.
    let c = mm.mremap(b, 5 * P, 6 * P, false).unwrap();
    assert_eq!(b, c);
    assert!(log.take().is_empty());
}

#[test]
fn oom_reap_nonblock_unmap_per_private_vma_skips_on_again() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 1);
    let b = populated(&mm, 1, 1);
    let shared = mm.mmap(P, Prot::RW, MapKind::AnonShared).unwrap();
    mm.write(shared, &[1]).unwrap();
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let report = mm.oom_reap();
    let calls = log.take();
    let s = starts(&calls);
    assert_eq!(
        s.len(),
        2,
        "one pair per private VMA, the shared one skipped"
    );
    assert!(s.contains(&(a, a + 2 * P, Event::Unmap, None)));
    assert!(s.contains(&(b, b + P, Event::Unmap, None)));
    assert!(calls
        .iter()
        .all(|c| !matches!(c, Call::Start(r) if r.blockable())));
    assert!(!report.needs_retry());
    assert!(mm.pte(a).is_none() && mm.pte(shared).is_some());
    assert_eq!(mm.fault(a, false), Err(Error::OomReaped));

    // A notifier that cannot proceed without sleeping: skip, report retry.
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 1);
    let log = Log::new(&mm);
    Rec::register_with(&mm, &log, true);
    let report = mm.oom_reap();
    assert_eq!(report.retry, vec![(a, a + 2 * P)]);
    assert!(report.reaped.is_empty());
    assert!(mm.pte(a).is_some(), "nothing zapped after Again");
    assert!(!log.take().iter().any(|c| matches!(c, Call::End(_))));
}

#[test]
fn madvise_dontneed_clear_per_vma_clipped() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 4, 3);
    mm.mprotect(a + 2 * P, 2 * P, Prot::READ).unwrap(); // two VMAs now
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let f = frame_at(&mm, a + P);
    mm.madvise_dontneed(a + P, 2 * P).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            (a + P, a + 2 * P, Event::Clear, None),
            (a + 2 * P, a + 3 * P, Event::Clear, None)
        ]
    );
    assert!(!phys.is_current(f));
    assert_eq!(byte(&mm, a + P), 0, "zero-filled after DONTNEED");
    assert_eq!(byte(&mm, a), 3);
    // A hole is an error and changes nothing.
    mm.munmap(a + 3 * P, P).unwrap();
    assert!(matches!(
        mm.madvise_dontneed(a, 4 * P),
        Err(Error::NotMapped { .. })
    ));
}

#[test]
fn madvise_free_clear_clipped_to_vma_then_reclaim_discards_clean_pages() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 9);
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    mm.madvise_free(a, 2 * P).unwrap();
    assert_eq!(
        starts(&log.take()),
        vec![(a, a + 2 * P, Event::Clear, None)]
    );
    mm.write(a + P, &[42]).unwrap(); // redirtied: kept
    let before = phys.stats().swap_slots;
    assert_eq!(mm.swap_out(a, 2 * P).unwrap(), 2);
    assert_eq!(
        phys.stats().swap_slots,
        before + 1,
        "only the dirty page goes to swap"
    );
    assert_eq!(byte(&mm, a), 0, "clean lazily-freed page discarded");
    assert_eq!(byte(&mm, a + P), 42);
    let s = mm.mmap(P, Prot::RW, MapKind::AnonShared).unwrap();
    assert!(matches!(
        mm.madvise_free(s, P),
        Err(Error::NotMapped { .. })
    ));
}

#[test]
fn mprotect_protection_vma_lazily_per_pud_from_first_populated_pmd() {
    let (_phys, mm) = machine(64);
    // A mapping crossing a PUD boundary: [PUD - 4 MiB, PUD + 8 MiB).
    let base = 4 * PUD_SIZE;
    let start = base - 2 * PMD_SIZE;
    let len = 6 * PMD_SIZE;
    mm.mmap_fixed(start, len, Prot::RW, MapKind::AnonPrivate)
        .unwrap();
    // First PUD range: populated only in its second PMD, at an offset.
    let p1 = start + PMD_SIZE + 5 * P;
    // Second PUD range: populated in its third PMD.
    let p2 = base + 2 * PMD_SIZE + 7 * P;
    mm.write(p1, &[1]).unwrap();
    mm.write(p2, &[2]).unwrap();
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    TlbRec::register(&mm, &log);
    mm.mprotect(start, len, Prot::READ).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            (start + PMD_SIZE, base, Event::ProtectionVma, None),
            (base + 2 * PMD_SIZE, start + len, Event::ProtectionVma, None),
        ]
    );
    assert_pairs_nested(&calls);
    // The flush of each range happens inside its pair, after the change.
    let order: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, Call::Start(_) | Call::End(_) | Call::Tlb(..)))
        .map(|c| match c {
            Call::Start(_) => 'S',
            Call::End(_) => 'E',
            _ => 'T',
        })
        .collect();
    assert_eq!(order, vec!['S', 'T', 'E', 'S', 'T', 'E']);
    assert!(!mm.pte(p1).unwrap().write && !mm.pte(p2).unwrap().write);
    // A range with no page tables gets no pair at all.
    let empty = mm.mmap(4 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.mprotect(empty, 4 * P, Prot::READ).unwrap();
    assert!(starts(&log.take()).is_empty());
    assert!(matches!(mm.write(p1, &[3]), Err(Error::Protection { .. })));
}

#[test]
fn fork_protection_page_on_parent_for_cow_vmas_only() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 20);
    let untouched = mm.mmap(2 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let shared = mm.mmap(P, Prot::RW, MapKind::AnonShared).unwrap();
    mm.write(shared, &[7]).unwrap();
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let child = mm.fork().unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![(a, a + 2 * P, Event::ProtectionPage, None)]
    );
    assert_pairs_nested(&calls);
    assert!(!mm.pte(a).unwrap().write, "parent write-protected");
    assert_eq!(mm.pte(a).unwrap().pfn(), child.pte(a).unwrap().pfn());
    assert!(
        child.pte(shared).is_none(),
        "shared mappings are faulted lazily"
    );
    let _ = untouched;
    // COW isolation both ways; the shared page is shared.
    child.write(a, &[99]).unwrap();
    assert_eq!(byte(&mm, a), 20);
    mm.write(a + P, &[55]).unwrap();
    assert_eq!(byte(&child, a + P), 21);
    child.write(shared, &[8]).unwrap();
    assert_eq!(byte(&mm, shared), 8);
    // The parent's COW break notified the parent only.
    let calls = log.take();
    assert_eq!(starts(&calls), vec![(a + P, a + 2 * P, Event::Clear, None)]);
}

#[test]
fn cow_fault_clear_then_change_pte_while_primary_pte_is_cleared() {
    let (phys, mm) = machine(64);
    let a = mm.mmap(P, Prot::RW, MapKind::AnonPrivate).unwrap();
    assert_eq!(byte(&mm, a), 0); // zero page
    assert!(mm.pte(a).unwrap().is_zero());
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    TlbRec::register(&mm, &log);
    mm.write(a, &[1]).unwrap();
    let calls = log.take();
    let new_pfn = mm.pte(a).unwrap().pfn().unwrap();
    assert_eq!(
        calls,
        vec![
            Call::Start(mmu_notifier::Range::new(a, a + P, Event::Clear).unwrap()),
            Call::Tlb(a, a + P),
            Call::ChangePte {
                addr: a,
                pfn: new_pfn,
                writable: true,
                primary: None
            },
            Call::End(mmu_notifier::Range::new(a, a + P, Event::Clear).unwrap()),
        ]
    );
    // A private page shared with a fork child: COW, the old frame stays
    // (the child maps it); the child's own last-user write reuses in place.
    let child = mm.fork().unwrap();
    log.take();
    let old = frame_at(&mm, a);
    mm.write(a, &[2]).unwrap();
    assert!(phys.is_current(old));
    assert_ne!(frame_at(&mm, a), old);
    assert!(log
        .take()
        .iter()
        .any(|c| matches!(c, Call::ChangePte { .. })));
    child.write(a, &[3]).unwrap();
    assert_eq!(frame_at(&child, a), old, "exclusive again: reused, no copy");
}

#[test]
fn ksm_write_protect_and_merge_clear_with_change_pte() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 3, 0);
    for i in 0..3 {
        mm.write(a + i * P, &[4]).unwrap(); // identical contents
    }
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let in_use = phys.stats().in_use;
    assert_eq!(mm.ksm_merge(a, 3 * P).unwrap(), 2);
    let calls = log.take();
    assert!(starts(&calls)
        .iter()
        .all(|s| s.2 == Event::Clear && s.1 - s.0 == P));
    assert_pairs_nested(&calls);
    let k = mm.pte(a).unwrap().pfn().unwrap();
    for i in 0..3 {
        let pte = mm.pte(a + i * P).unwrap();
        assert_eq!(pte.pfn(), Some(k));
        assert!(!pte.write);
    }
    // Every change_pte announces a read-only PTE, while the primary PTE is
    // cleared: the page itself (write_protect_page) or the KSM page
    // (replace_page, one per merged page).
    let cps: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            Call::ChangePte {
                addr,
                pfn,
                writable,
                primary,
            } => Some((*addr, *pfn, *writable, *primary)),
            _ => None,
        })
        .collect();
    assert_eq!(cps.iter().filter(|c| c.1 == k && c.0 != a).count(), 2);
    assert!(cps.iter().all(|c| !c.2 && c.3.is_none()));
    assert_eq!(phys.stats().in_use, in_use - 2);
    // A write to a KSM page always copies.
    mm.write(a, &[5]).unwrap();
    assert_ne!(mm.pte(a).unwrap().pfn(), Some(k));
    assert_eq!(byte(&mm, a + P), 4);
}

#[test]
fn reclaim_swap_out_clear_per_page_frame_freed_after_end() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 30);
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let f = frame_at(&mm, a);
    log.watch(&[f]);
    assert_eq!(mm.swap_out(a, P).unwrap(), 1);
    let calls = log.take();
    assert_eq!(starts(&calls), vec![(a, a + P, Event::Clear, None)]);
    assert_eq!(*log.alive_at_invalidate.lock().unwrap(), vec![true]);
    assert!(!phys.is_current(f));
    assert!(matches!(mm.pte(a).unwrap().kind, PteKind::Swap { .. }));
    assert_eq!(byte(&mm, a), 30, "swapped back in");
    // Pinned pages are not reclaimed.
    let pin = mm.pin(a + P, 1, true).unwrap();
    assert_eq!(mm.swap_out(a + P, P).unwrap(), 0);
    pin.unpin().unwrap();
}

#[test]
fn page_migration_clear_per_page() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 40);
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let old = [frame_at(&mm, a), frame_at(&mm, a + P)];
    log.watch(&old[..1]);
    assert_eq!(mm.migrate_pages(a, 2 * P).unwrap(), 2);
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            (a, a + P, Event::Clear, None),
            (a + P, a + 2 * P, Event::Clear, None)
        ]
    );
    // Page 0's frame is alive at its own invalidation, freed before page 1's.
    assert_eq!(*log.alive_at_invalidate.lock().unwrap(), vec![true, false]);
    assert!(old.iter().all(|f| !phys.is_current(*f)));
    assert_eq!(byte(&mm, a + P), 41);
}

#[test]
fn device_migration_collect_and_lazy_insert_carry_the_owner() {
    let (_phys, mm) = machine(64);
    let a = mm.mmap(4 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(a, &[1]).unwrap(); // page 0 present
    mm.write(a + P, &[2]).unwrap(); // page 1 present
    let _ = byte(&mm, a + 3 * P); // page 3 zero page; page 2 is a hole
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let dev = Owner(7);
    let moved = mm.migrate_to_device(a, 4 * P, dev).unwrap();
    assert_eq!(moved.len(), 4);
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            (a, a + 4 * P, Event::Migrate, Some(dev)),
            // started lazily at the first hole to fill
            (a + 2 * P, a + 4 * P, Event::Migrate, Some(dev)),
        ]
    );
    assert_pairs_nested(&calls);
    for i in 0..4 {
        assert!(
            matches!(mm.pte(a + i * P).unwrap().kind, PteKind::DevicePrivate { owner, .. } if owner == dev)
        );
    }
    // A CPU access migrates one page back: MIGRATE with the device as owner.
    assert_eq!(byte(&mm, a + P), 2);
    assert_eq!(
        starts(&log.take()),
        vec![(a + P, a + 2 * P, Event::Migrate, Some(dev))]
    );
    assert!(matches!(
        mm.pte(a + P).unwrap().kind,
        PteKind::Present { .. }
    ));
}

#[test]
fn make_exclusive_with_owner_and_cpu_revoke_without() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 50);
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    let dev = Owner(3);
    let frames = mm.make_device_exclusive(a, 2 * P, Some(dev)).unwrap();
    assert!(frames.iter().all(Option::is_some));
    assert_eq!(
        starts(&log.take()),
        vec![
            (a, a + P, Event::Exclusive, Some(dev)),
            (a + P, a + 2 * P, Event::Exclusive, Some(dev))
        ]
    );
    assert!(matches!(
        mm.pte(a).unwrap().kind,
        PteKind::DeviceExclusive { .. }
    ));
    assert_eq!(byte(&mm, a), 50);
    assert_eq!(
        starts(&log.take()),
        vec![(a, a + P, Event::Exclusive, None)]
    );
    assert!(matches!(mm.pte(a).unwrap().kind, PteKind::Present { .. }));
}

#[test]
fn soft_dirty_clear_whole_mm_then_tlb_flush_after_end() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 0);
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    TlbRec::register(&mm, &log);
    mm.clear_soft_dirty();
    let calls = log.take();
    let whole = mmu_notifier::Range::new(0, END_OF_ADDRESS_SPACE, Event::SoftDirty).unwrap();
    assert_eq!(
        calls,
        vec![
            Call::Start(whole),
            Call::End(whole),
            Call::Tlb(0, END_OF_ADDRESS_SPACE)
        ]
    );
    let pte = mm.pte(a).unwrap();
    assert!(!pte.soft_dirty && !pte.write);
    mm.write(a, &[1]).unwrap(); // exclusive page: reused, soft-dirty again
    assert!(mm.pte(a).unwrap().soft_dirty);
    assert!(log.take().is_empty(), "re-enabling write sends nothing");
}

#[test]
fn writeback_protection_page_per_dirty_shared_page() {
    let (phys, mm) = machine(64);
    let file = SharedObject::new_file(&phys, 4, b"file data").unwrap();
    let a = mm
        .mmap(
            4 * P,
            Prot::RW,
            MapKind::File {
                file: file.clone(),
                pgoff: 0,
            },
        )
        .unwrap();
    mm.write(a + 2 * P, &[1]).unwrap();
    let mut b = [0u8; 9];
    mm.read(a, &mut b).unwrap();
    assert_eq!(&b, b"file data");
    let log = Log::new(&mm);
    Rec::register(&mm, &log);
    assert_eq!(mm.writeback(a, 4 * P).unwrap(), 1);
    assert_eq!(
        starts(&log.take()),
        vec![(a + 2 * P, a + 3 * P, Event::ProtectionPage, None)]
    );
    assert!(!mm.pte(a + 2 * P).unwrap().write);
    let mut f = [0u8];
    file.pread(2 * P, &mut f).unwrap();
    assert_eq!(f, [1]);
}

#[test]
fn reclaim_aging_young_callbacks() {
    let (_phys, mm) = machine(64);
    let a = populated(&mm, 2, 0);
    let log = Log::new(&mm);
    let rec = Rec::register(&mm, &log);
    TlbRec::register(&mm, &log);
    // PTEs are young after the writes: both referenced, each flushed.
    assert_eq!(mm.age(a, 2 * P).unwrap(), 2);
    assert_eq!(
        log.take(),
        vec![
            Call::Tlb(a, a + P),
            Call::ClearFlushYoung(a, a + P),
            Call::Tlb(a + P, a + 2 * P),
            Call::ClearFlushYoung(a + P, a + 2 * P),
        ]
    );
    // Old PTEs: only the secondary's answer counts; no flush.
    assert_eq!(mm.age(a, 2 * P).unwrap(), 0);
    rec.young.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(mm.clear_young(a, 2 * P).unwrap(), 2);
    let calls = log.take();
    assert!(
        calls.contains(&Call::ClearYoung(a, a + P))
            && !calls.iter().any(|c| matches!(c, Call::Tlb(..)))
    );
    // test_young: the PTE bit short-circuits; otherwise the notifiers answer.
    mm.write(a, &[1]).unwrap();
    assert!(mm.test_young(a));
    assert!(!log.take().iter().any(|c| matches!(c, Call::TestYoung(_))));
    assert!(mm.test_young(a + P));
    assert_eq!(log.take(), vec![Call::TestYoung(a + P)]);
}

#[test]
fn secondary_tlb_flush_precedes_every_free() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 3, 0);
    let log = Log::new(&mm);
    TlbRec::register(&mm, &log);
    let frames: Vec<_> = (0..3).map(|i| frame_at(&mm, a + i * P)).collect();
    log.watch(&frames);
    mm.munmap(a, 3 * P).unwrap();
    assert_eq!(log.take(), vec![Call::Tlb(a, a + 3 * P)]);
    assert_eq!(*log.alive_at_invalidate.lock().unwrap(), vec![true]);
    assert!(frames.iter().all(|f| !phys.is_current(*f)));
}

#[test]
fn mm_users_and_exit_with_pinned_frames() {
    let (phys, mm) = machine(64);
    let a = populated(&mm, 2, 60);
    let pin = mm.pin(a, 2, true).unwrap();
    let grab = mm.grab();
    let second = grab.get().unwrap();
    assert_eq!(grab.users(), 2);
    drop(mm);
    assert!(!grab.is_exited());
    assert!(second.exit(), "the last user exits");
    assert!(grab.is_exited());
    assert!(matches!(grab.get(), Err(Error::Exited)));
    // The pinned frames outlive the address space.
    for f in pin.frames() {
        assert!(phys.is_current(*f));
    }
    let mut b = [0u8];
    phys.read_frame(pin.frames()[1], 0, &mut b).unwrap();
    assert_eq!(b, [61]);
    pin.unpin().unwrap();
    assert!(matches!(pin.unpin(), Err(Error::AlreadyUnpinned)));
    assert_eq!(phys.stats().in_use, 1, "only the zero page is left");
    let _ = Mm::new(&phys);
}
