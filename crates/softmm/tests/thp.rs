//! Transparent huge pages: one test per THP row of the call-site table
//! (hook, event, range, nesting), the frame accounting of compound pages,
//! and the oracle over a device that maps a THP whole or page by page.

mod common;

use common::*;
use mmu_notifier::{Event, IntervalNotifier, IntervalOps, Owner, Range};
use softmm::{
    Collapse, HmmRange, MapKind, Mm, PhysMem, Prot, PteKind, ViolationKind, HPAGE_PMD_NR, PMD_SIZE,
};
use std::sync::Arc;

/// Enough frames for three THPs (frames 0..512 hold the zero page).
const FRAMES: usize = 4 * HPAGE_PMD_NR as usize;

/// Maps `blocks` 2 MiB blocks (2 MiB aligned) under MADV_HUGEPAGE and
/// writes `fill` at the start of each page of the first block (the first
/// write faults in a THP). Returns the address.
fn thp(mm: &Mm, blocks: u64, fill: u8) -> u64 {
    let a = mm
        .mmap(blocks * PMD_SIZE, Prot::RW, MapKind::AnonPrivate)
        .unwrap();
    assert_eq!(a % PMD_SIZE, 0, "mmap places the test range aligned");
    mm.madvise_hugepage(a, blocks * PMD_SIZE).unwrap();
    for i in 0..HPAGE_PMD_NR {
        mm.write(a + i * P, &[fill.wrapping_add(i as u8)]).unwrap();
    }
    assert!(mm.is_pmd_mapped(a));
    a
}

fn clear(s: u64) -> (u64, u64, Event, Option<Owner>) {
    (s, s + PMD_SIZE, Event::Clear, None)
}

#[test]
fn a_fault_in_a_madv_hugepage_block_maps_one_thp_without_a_notifier() {
    let (phys, mm) = machine(FRAMES);
    let log = log_of(&mm);
    let a = thp(&mm, 2, 1);
    assert!(log.take().is_empty(), "filling a none PMD notifies nobody");
    let ptes = mm.ptes();
    assert_eq!(ptes.len() as u64, HPAGE_PMD_NR);
    let head = ptes[0].1.pfn().unwrap();
    assert_eq!(head % HPAGE_PMD_NR, 0, "a THP is aligned to its size");
    for (i, (va, pte)) in ptes.iter().enumerate() {
        assert_eq!(*va, a + i as u64 * P);
        assert_eq!(
            pte.kind,
            PteKind::Present {
                pfn: head + i as u64
            }
        );
        assert!(pte.write && pte.dirty);
    }
    assert_eq!(phys.stats().huge_allocs, 1);
    // A read fault in the second block allocates a THP too (use_zero_page
    // off), and the data of the first is where it was written.
    assert_eq!(byte(&mm, a + PMD_SIZE + 5 * P), 0);
    assert!(mm.is_pmd_mapped(a + PMD_SIZE));
    assert_eq!(byte(&mm, a + 7 * P), 8);
    assert_eq!(phys.stats().huge_allocs, 2);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn no_thp_without_the_advice_outside_an_aligned_block_or_without_free_runs() {
    // Not advised.
    let (_, mm) = machine(FRAMES);
    let a = mm.mmap(PMD_SIZE, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(a, &[1]).unwrap();
    assert!(!mm.is_pmd_mapped(a));
    // Advised, but the VMA holds no whole aligned block.
    let (_, mm) = machine(FRAMES);
    let a = mm
        .mmap(PMD_SIZE + P, Prot::RW, MapKind::AnonPrivate)
        .unwrap();
    mm.munmap(a, P).unwrap();
    mm.madvise_hugepage(a + P, PMD_SIZE).unwrap();
    mm.write(a + P, &[1]).unwrap();
    assert!(!mm.is_pmd_mapped(a + P));
    // Advised and aligned, but no aligned run of 512 free frames: a base
    // page (the fallback), and the write lands.
    let (phys, mm) = machine(HPAGE_PMD_NR as usize + 16);
    let a = mm.mmap(PMD_SIZE, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.madvise_hugepage(a, PMD_SIZE).unwrap();
    mm.write(a, &[9]).unwrap();
    assert!(!mm.is_pmd_mapped(a));
    assert_eq!(byte(&mm, a), 9);
    assert_eq!(phys.stats().huge_allocs, 0);
}

#[test]
fn a_partial_munmap_splits_the_pmd_before_the_unmap_pair() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    TlbRec::register(&mm, &log);
    let gone = frame_at(&mm, a + P);
    let kept = frame_at(&mm, a + 2 * P);
    mm.munmap(a + P, P).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![clear(a), (a + P, a + 2 * P, Event::Unmap, None)]
    );
    assert_pairs_nested(&calls);
    // The split flushed the PMD's TLB entry inside its pair.
    let split_end = calls
        .iter()
        .position(|c| matches!(c, Call::End(r) if r.start() == a))
        .unwrap();
    assert!(calls[..split_end].contains(&Call::Tlb(a, a + PMD_SIZE)));
    assert!(!mm.is_pmd_mapped(a));
    assert!(!phys.is_current(gone), "the unmapped page is freed");
    assert_eq!(
        frame_at(&mm, a + 2 * P),
        kept,
        "the rest maps the same frames"
    );
    assert_eq!(byte(&mm, a + 2 * P), 3);
    assert_eq!(mm.ptes().len() as u64, HPAGE_PMD_NR - 1);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn munmap_of_a_whole_thp_zaps_the_pmd_as_one_gather_entry() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    TlbRec::register(&mm, &log);
    let head = frame_at(&mm, a);
    log.watch(&[head]);
    mm.munmap(a, PMD_SIZE).unwrap();
    let calls = log.take();
    assert_eq!(starts(&calls), vec![(a, a + PMD_SIZE, Event::Unmap, None)]);
    // 512 frames are one batch entry: one flush, at the end of the zap
    // (a batch of 512 base pages would have flushed 16 times).
    let tlbs: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, Call::Tlb(..)))
        .collect();
    assert_eq!(tlbs, vec![&Call::Tlb(a, a + PMD_SIZE)]);
    assert!(log.alive_at_invalidate.lock().unwrap().iter().all(|&x| x));
    assert!(!phys.is_current(head));
    assert_eq!(phys.stats().in_use, 1, "only the zero page is left");
}

#[test]
fn mprotect_splits_a_thp_it_covers_in_part_and_keeps_one_it_covers_whole() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![(a, a + PMD_SIZE, Event::ProtectionVma, None)]
    );
    assert!(mm.is_pmd_mapped(a));
    assert!(mm.ptes().iter().all(|(_, p)| !p.write));
    // Writable again, then one page read-only: the VMA split splits the
    // PMD first (CLEAR over the block), then the PROTECTION_VMA pair.
    mm.mprotect(a, PMD_SIZE, Prot::RW).unwrap();
    log.take();
    mm.mprotect(a + P, P, Prot::READ).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![clear(a), (a + P, a + 2 * P, Event::ProtectionVma, None)]
    );
    assert!(!mm.is_pmd_mapped(a));
    assert_eq!(byte(&mm, a + P), 2);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn a_write_to_a_read_only_thp_only_this_mapping_uses_reuses_it() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    mm.mprotect(a, PMD_SIZE, Prot::RW).unwrap();
    let head = frame_at(&mm, a);
    let log = log_of(&mm);
    mm.write(a + 3 * P, &[42]).unwrap();
    assert!(
        log.take().is_empty(),
        "do_huge_pmd_wp_page reuse: no notifier"
    );
    assert!(mm.is_pmd_mapped(a));
    assert_eq!(frame_at(&mm, a), head);
    assert!(
        mm.pte(a + 100 * P).unwrap().write,
        "the whole PMD is writable"
    );
    check_accounting(&phys, &[&mm]);
}

#[test]
fn madvise_dontneed_splits_a_thp_it_covers_in_part_inside_its_pair() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    mm.madvise_dontneed(a + P, 2 * P).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![(a + P, a + 3 * P, Event::Clear, None), clear(a)]
    );
    // The split's pair is nested in the madvise's.
    assert!(matches!(calls.last(), Some(Call::End(r)) if r.start() == a + P));
    assert_pairs_nested(&calls);
    assert_eq!(byte(&mm, a + P), 0, "zapped");
    assert_eq!(byte(&mm, a + 3 * P), 4, "kept");
    // A whole block: the PMD is zapped, nothing split.
    let b = thp(&mm, 1, 1);
    log.take();
    mm.madvise_dontneed(b, PMD_SIZE).unwrap();
    assert_eq!(
        starts(&log.take()),
        vec![(b, b + PMD_SIZE, Event::Clear, None)]
    );
    assert!(!mm.is_pmd_mapped(b));
    check_accounting(&phys, &[&mm]);
}

#[test]
fn madvise_free_splits_a_thp_it_covers_in_part() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    mm.madvise_free(a, 4 * P).unwrap();
    let calls = log.take();
    // split_folio: the PMD split, then the unmap to migration entries.
    assert_eq!(
        starts(&calls),
        vec![(a, a + 4 * P, Event::Clear, None), clear(a), clear(a)]
    );
    assert_pairs_nested(&calls);
    assert!(!mm.is_pmd_mapped(a));
    assert_eq!(byte(&mm, a + 5 * P), 6, "the pages come back mapped");
    // Reclaim discards the clean lazily-freed pages only.
    assert_eq!(mm.swap_out(a, 8 * P).unwrap(), 8);
    assert_eq!(byte(&mm, a), 0, "discarded");
    assert_eq!(byte(&mm, a + 5 * P), 6, "swapped and back");
    check_accounting(&phys, &[&mm]);
}

#[test]
fn fork_shares_the_thp_and_a_cow_write_splits_before_copying_one_page() {
    let (phys, parent) = machine(FRAMES);
    let a = thp(&parent, 1, 1);
    let plog = log_of(&parent);
    let head = frame_at(&parent, a);
    let child = parent.fork().unwrap();
    assert_eq!(
        starts(&plog.take()),
        vec![(a, a + PMD_SIZE, Event::ProtectionPage, None)]
    );
    assert!(parent.is_pmd_mapped(a) && child.is_pmd_mapped(a));
    assert_eq!(frame_at(&child, a), head);
    assert_eq!(phys.mapcount(head.pfn), 2);
    assert!(!parent.pte(a).unwrap().write && !child.pte(a).unwrap().write);
    assert!(!child.pte(a).unwrap().young, "the child's PMD is old");
    check_accounting(&phys, &[&parent, &child]);
    let clog = log_of(&child);
    child.write(a + P, &[99]).unwrap();
    let calls = clog.take();
    assert_eq!(
        starts(&calls),
        vec![clear(a), (a + P, a + 2 * P, Event::Clear, None)]
    );
    assert_pairs_nested(&calls);
    assert!(parent.is_pmd_mapped(a), "the parent keeps its PMD");
    assert!(!child.is_pmd_mapped(a));
    assert_eq!(byte(&parent, a + P), 2);
    assert_eq!(byte(&child, a + P), 99);
    assert_eq!(byte(&child, a + 2 * P), 3);
    check_accounting(&phys, &[&parent, &child]);
}

#[test]
fn aging_a_pmd_calls_the_young_callbacks_once_over_its_block() {
    let (_, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    assert_eq!(mm.age(a, PMD_SIZE).unwrap(), HPAGE_PMD_NR as usize);
    assert_eq!(
        log.take(),
        vec![Call::ClearFlushYoung(a, a + PMD_SIZE)],
        "pmdp_clear_flush_young_notify: one call for the block"
    );
    assert!(!mm.pte(a + 9 * P).unwrap().young, "the PMD's accessed bit");
    assert_eq!(mm.clear_young(a, P).unwrap(), 0);
    assert_eq!(log.take(), vec![Call::ClearYoung(a, a + PMD_SIZE)]);
}

#[test]
fn collapse_clears_the_block_under_one_clear_pair_then_maps_a_copy() {
    let (phys, mm) = machine(FRAMES);
    let a = mm.mmap(PMD_SIZE, Prot::RW, MapKind::AnonPrivate).unwrap();
    for i in [0, 7, 300] {
        mm.write(a + i * P, &[i as u8 + 1]).unwrap();
    }
    let old: Vec<_> = mm.ptes().iter().map(|&(va, _)| frame_at(&mm, va)).collect();
    assert_eq!(
        mm.collapse(a).unwrap(),
        Collapse::Skipped("the block is not inside one private MADV_HUGEPAGE VMA")
    );
    mm.madvise_hugepage(a, PMD_SIZE).unwrap();
    let log = log_of(&mm);
    TlbRec::register(&mm, &log);
    log.watch(&old);
    assert_eq!(mm.collapse(a).unwrap(), Collapse::Collapsed);
    let calls = log.take();
    assert_eq!(starts(&calls), vec![clear(a)]);
    // pmdp_collapse_flush inside the pair; the old pages were alive then.
    assert!(calls.contains(&Call::Tlb(a, a + PMD_SIZE)));
    assert!(log.alive_at_invalidate.lock().unwrap().iter().all(|&x| x));
    assert!(mm.is_pmd_mapped(a));
    assert!(old.iter().all(|f| !phys.is_current(*f)), "old pages freed");
    for i in [0, 7, 300] {
        assert_eq!(byte(&mm, a + i * P), i as u8 + 1);
    }
    assert_eq!(byte(&mm, a + 8 * P), 0);
    assert_eq!(mm.collapse(a).unwrap(), Collapse::Skipped("already a THP"));
    check_accounting(&phys, &[&mm]);
}

#[test]
fn collapse_skips_blocks_with_pins_swap_entries_or_only_read_only_pages() {
    let (_, mm) = machine(FRAMES);
    let a = mm.mmap(PMD_SIZE, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(a, &[1]).unwrap();
    mm.madvise_hugepage(a, PMD_SIZE).unwrap();
    let pin = mm.pin(a, 1, false).unwrap();
    assert!(matches!(mm.collapse(a).unwrap(), Collapse::Skipped(_)));
    drop(pin);
    mm.swap_out(a, P).unwrap();
    assert!(matches!(mm.collapse(a).unwrap(), Collapse::Skipped(_)));
    mm.madvise_dontneed(a, PMD_SIZE).unwrap();
    mm.fault(a, false).unwrap(); // a THP now (read fault)
    mm.madvise_dontneed(a, PMD_SIZE).unwrap();
    assert!(
        matches!(mm.collapse(a).unwrap(), Collapse::Skipped(_)),
        "all none"
    );
    assert!(mm.collapse(1 << 60).is_err(), "bad address");
}

#[test]
fn swap_out_of_a_thp_splits_then_unmaps_its_block_under_one_pair() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    assert_eq!(mm.swap_out(a, P).unwrap(), HPAGE_PMD_NR as usize);
    let calls = log.take();
    assert_eq!(starts(&calls), vec![clear(a), clear(a)]);
    assert_pairs_nested(&calls);
    assert_eq!(phys.stats().in_use, 1);
    assert_eq!(byte(&mm, a + 10 * P), 11, "swapped back in");
    check_accounting(&phys, &[&mm]);
}

#[test]
fn device_migration_of_a_thp_splits_it_inside_the_migrate_pair() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    let dev = Owner(7);
    let moved = mm.migrate_to_device(a + P, P, dev).unwrap();
    assert_eq!(moved.len(), 1);
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            (a + P, a + 2 * P, Event::Migrate, Some(dev)),
            clear(a),
            clear(a)
        ]
    );
    assert_pairs_nested(&calls);
    assert!(matches!(
        mm.pte(a + P).unwrap().kind,
        PteKind::DevicePrivate { .. }
    ));
    assert_eq!(byte(&mm, a + 2 * P), 3);
    assert_eq!(byte(&mm, a + P), 2, "migrated back on the CPU access");
    check_accounting(&phys, &[&mm]);
}

#[test]
fn making_a_thp_page_exclusive_splits_the_pmd_first() {
    let (_, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    let got = mm.make_device_exclusive(a + P, P, Some(Owner(3))).unwrap();
    assert!(got[0].is_some());
    assert_eq!(
        starts(&log.take()),
        vec![
            clear(a),
            (a + P, a + 2 * P, Event::Exclusive, Some(Owner(3)))
        ]
    );
}

#[test]
fn ksm_and_system_migration_split_a_thp_first() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 0);
    // Pages 256 and 512 - 256 hold the same byte (fill wraps at 256).
    let log = log_of(&mm);
    let merged = mm.ksm_merge(a, PMD_SIZE).unwrap();
    assert!(merged > 0);
    let s = starts(&log.take());
    assert_eq!(&s[..2], &[clear(a), clear(a)], "split_folio first");
    assert!(!mm.is_pmd_mapped(a));
    check_accounting(&phys, &[&mm]);
    let b = thp(&mm, 1, 5);
    log.take();
    assert!(mm.migrate_pages(b, PMD_SIZE).unwrap() > 0);
    let s = starts(&log.take());
    assert_eq!(
        &s[..3],
        &[clear(b), clear(b), (b, b + P, Event::Clear, None)]
    );
    assert_eq!(byte(&mm, b + 3 * P), 8);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn mremap_moves_an_aligned_pmd_whole_and_splits_one_it_cannot_move() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let head = frame_at(&mm, a);
    let log = log_of(&mm);
    let dst = a + 8 * PMD_SIZE;
    mm.mremap_fixed(a, PMD_SIZE, PMD_SIZE, dst).unwrap();
    assert_eq!(
        starts(&log.take())[0],
        (a, a + PMD_SIZE, Event::Unmap, None)
    );
    assert!(mm.is_pmd_mapped(dst));
    assert_eq!(frame_at(&mm, dst), head);
    // To an unaligned address: split (nested in the move's UNMAP pair).
    let odd = dst + 16 * PMD_SIZE + P;
    mm.mremap_fixed(dst, PMD_SIZE, PMD_SIZE, odd).unwrap();
    let calls = log.take();
    assert_eq!(
        &starts(&calls)[..2],
        &[(dst, dst + PMD_SIZE, Event::Unmap, None), clear(dst)]
    );
    assert_pairs_nested(&calls);
    assert!(!mm.is_pmd_mapped(odd));
    assert_eq!(byte(&mm, odd + 4 * P), 5);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn advice_on_part_of_a_thp_splits_its_pmd_and_exit_frees_it() {
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let log = log_of(&mm);
    mm.madvise_nohugepage(a + P, P).unwrap();
    assert_eq!(starts(&log.take()), vec![clear(a)]);
    assert!(!mm.is_pmd_mapped(a));
    let b = thp(&mm, 1, 1);
    assert!(mm.is_pmd_mapped(b));
    drop(mm);
    let s = phys.stats();
    assert_eq!((s.in_use, s.underflows), (1, 0));
}

#[test]
fn range_fault_reports_order_9_for_the_pages_of_a_pmd_mapping() {
    struct Dev;
    impl IntervalOps for Dev {
        fn invalidate(&self, sub: &IntervalNotifier, _r: &Range, seq: u64) -> bool {
            sub.set_seq(seq);
            true
        }
    }
    let (_, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let small = mm.mmap(2 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(small, &[1]).unwrap();
    let sub = mm
        .subscriptions()
        .interval_insert(a, PMD_SIZE, Arc::new(Dev))
        .unwrap();
    let seq = sub.read_begin().unwrap();
    let mut r = HmmRange::new(&sub, seq, a, a + PMD_SIZE);
    mm.mmap_read().range_fault(&mut r).unwrap();
    assert!(r
        .pfns
        .iter()
        .all(|p| p.valid && p.order == softmm::PMD_ORDER));
    let sub2 = mm
        .subscriptions()
        .interval_insert(small, P, Arc::new(Dev))
        .unwrap();
    let seq = sub2.read_begin().unwrap();
    let mut r = HmmRange::new(&sub2, seq, small, small + P);
    mm.mmap_read().range_fault(&mut r).unwrap();
    assert_eq!(r.pfns[0].order, 0);
    sub.remove().unwrap();
    sub2.remove().unwrap();
}

/// Maps the THP at `a` into a device both ways: the 512 frames as one huge
/// entry, and page by page.
fn device_views(mm: &Mm, a: u64) -> Vec<softmm::FrameRef> {
    (0..HPAGE_PMD_NR).map(|i| frame_at(mm, a + i * P)).collect()
}

#[test]
fn the_oracle_checks_a_device_mapping_a_thp_whole_or_by_pages() {
    let (phys, mm) = machine(FRAMES);
    let oracle = phys.oracle();
    let a = thp(&mm, 1, 1);
    let frames = device_views(&mm, a);
    oracle.check_access_huge(&mm, a, &frames, true).unwrap();
    oracle
        .check_access(&mm, a + 5 * P, frames[5], true)
        .unwrap();
    // A wrong shape is refused.
    assert!(oracle
        .check_access_huge(&mm, a + P, &frames, false)
        .is_err());
    assert!(oracle
        .check_access_huge(&mm, a, &frames[1..], false)
        .is_err());
    // Read-only: the write is caught both ways, the read is fine.
    mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    oracle.check_access_huge(&mm, a, &frames, false).unwrap();
    assert_eq!(
        oracle
            .check_access_huge(&mm, a, &frames, true)
            .unwrap_err()
            .kind,
        ViolationKind::Permission
    );
    // One page unmapped: a device that kept the huge entry is caught at
    // that page; one that kept its page entries only at that page.
    mm.munmap(a + 9 * P, P).unwrap();
    let v = oracle
        .check_access_huge(&mm, a, &frames, false)
        .unwrap_err();
    assert_eq!(v.vaddr, a + 9 * P);
    assert!(oracle
        .check_access(&mm, a + 9 * P, frames[9], false)
        .is_err());
    oracle
        .check_access(&mm, a + 8 * P, frames[8], false)
        .unwrap();
}

#[test]
fn stale_tlb_entries_of_a_pmd_are_honoured_until_the_flush() {
    // A device that writes through its TLB while the flush of a
    // write-protect runs (the PMD changed, its old writable entry not yet
    // flushed) is coherent, as a CPU with the old TLB entry would be; after
    // the flush it is not.
    struct Probe {
        mm: softmm::MmGrab,
        phys: Arc<PhysMem>,
        a: u64,
        frame: std::sync::Mutex<Option<softmm::FrameRef>>,
        ok: std::sync::Mutex<Vec<bool>>,
    }
    impl mmu_notifier::MmuNotifier for Probe {
        fn callbacks(&self) -> mmu_notifier::Callbacks {
            mmu_notifier::Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS
        }
        fn arch_invalidate_secondary_tlbs(&self, _s: u64, _e: u64) {
            let f = self.frame.lock().unwrap().unwrap();
            let ok = self
                .phys
                .oracle()
                .check_access(&self.mm, self.a + 3 * P, f, true);
            self.ok.lock().unwrap().push(ok.is_ok());
        }
    }
    let (phys, mm) = machine(FRAMES);
    let a = thp(&mm, 1, 1);
    let probe = Arc::new(Probe {
        mm: mm.grab(),
        phys: phys.clone(),
        a,
        frame: std::sync::Mutex::new(Some(frame_at(&mm, a + 3 * P))),
        ok: Default::default(),
    });
    mm.subscriptions().register(probe.clone()).unwrap();
    mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    assert_eq!(*probe.ok.lock().unwrap(), vec![true]);
    let f = frame_at(&mm, a + 3 * P);
    assert!(phys.oracle().check_access(&mm, a + 3 * P, f, true).is_err());
}
