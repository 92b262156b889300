//! hugetlb (`MapKind::Hugetlb`): one test per hugetlb row of the call-site
//! table (hook, event, range with the PMD-sharing widening, nesting), the
//! alignment rules, and the operations that leave hugetlb memory alone.

mod common;

use common::*;
use mmu_notifier::{Event, Owner, END_OF_ADDRESS_SPACE};
use softmm::{Error, MapKind, Mm, Prot, HPAGE_PMD_NR, PMD_SIZE, PUD_SIZE};

/// Room for six huge pages (frames 0..512 hold the zero page).
const FRAMES: usize = 7 * HPAGE_PMD_NR as usize;
const H: u64 = PMD_SIZE;

fn private(mm: &Mm, n: u64) -> u64 {
    mm.mmap(n * H, Prot::RW, MapKind::Hugetlb { shared: false })
        .unwrap()
}

fn shared(mm: &Mm, n: u64) -> u64 {
    mm.mmap(n * H, Prot::RW, MapKind::Hugetlb { shared: true })
        .unwrap()
}

type Start = (u64, u64, Event, Option<Owner>);

fn pair(s: u64, e: u64, ev: Event) -> Start {
    (s, e, ev, None)
}

#[test]
fn a_fault_maps_a_whole_huge_page_without_a_notifier() {
    let (phys, mm) = machine(FRAMES);
    let log = log_of(&mm);
    let a = private(&mm, 2);
    assert_eq!(a % H, 0, "hugetlb mappings are 2 MiB aligned");
    mm.write(a + 5 * P, &[7]).unwrap();
    assert!(log.take().is_empty());
    assert!(mm.is_pmd_mapped(a));
    assert_eq!(mm.ptes().len() as u64, HPAGE_PMD_NR);
    assert_eq!(phys.stats().huge_allocs, 1);
    // A private read fault maps read-only; the write that follows reuses
    // the page (the only mapping), without a notifier either.
    assert_eq!(byte(&mm, a + H), 0);
    assert!(!mm.pte(a + H).unwrap().write);
    let head = frame_at(&mm, a + H);
    mm.write(a + H, &[1]).unwrap();
    assert!(log.take().is_empty());
    assert_eq!(frame_at(&mm, a + H), head);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn lengths_round_up_and_fixed_addresses_must_be_aligned() {
    let (_, mm) = machine(FRAMES);
    let a = mm
        .mmap(3 * P, Prot::RW, MapKind::Hugetlb { shared: false })
        .unwrap();
    let v = mm.vma(a).unwrap();
    assert_eq!(v.end - v.start, H, "rounded up to one huge page");
    let bad = mm.mmap_fixed(
        a + 16 * H + P,
        H,
        Prot::RW,
        MapKind::Hugetlb { shared: false },
    );
    assert!(matches!(bad, Err(Error::InvalidRange { .. })));
    // No huge page free: the fault fails (Linux: SIGBUS), nothing leaks.
    let (phys, mm) = machine(HPAGE_PMD_NR as usize + 8);
    let a = private(&mm, 1);
    assert!(matches!(mm.write(a, &[1]), Err(Error::OutOfMemory)));
    drop(mm);
    assert_eq!(phys.stats().in_use, 1);
}

#[test]
fn a_split_at_an_unaligned_address_is_refused_and_changes_nothing() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 2);
    mm.write(a, &[1]).unwrap();
    let log = log_of(&mm);
    for r in [
        mm.munmap(a + P, P),
        mm.mprotect(a, H + P, Prot::READ),
        mm.madvise_hugepage(a + P, P),
        mm.mmap_fixed(a + H - P, 2 * P, Prot::RW, MapKind::AnonPrivate)
            .map(|_| ()),
        mm.madvise_dontneed(a + P, H),
    ] {
        assert!(matches!(r, Err(Error::InvalidRange { .. })), "{r:?}");
    }
    assert!(log.take().is_empty());
    assert_eq!(byte(&mm, a), 1);
    assert_eq!(mm.vmas().len(), 1);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn munmap_nests_an_unmap_pair_per_hugetlb_vma_in_its_own() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 2);
    mm.write(a, &[1]).unwrap();
    let head = frame_at(&mm, a);
    let log = log_of(&mm);
    mm.munmap(a, 2 * H).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            pair(a, a + 2 * H, Event::Unmap),
            pair(a, a + 2 * H, Event::Unmap)
        ]
    );
    assert_pairs_nested(&calls);
    assert!(!phys.is_current(head));
    assert_eq!(phys.stats().in_use, 1);
}

#[test]
fn madvise_dontneed_rounds_the_end_down_and_nests_the_unmap() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 2);
    mm.write(a, &[1]).unwrap();
    mm.write(a + H, &[2]).unwrap();
    let log = log_of(&mm);
    // One and a half huge pages: only the first is zapped.
    mm.madvise_dontneed(a, H + H / 2).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![pair(a, a + H, Event::Clear), pair(a, a + H, Event::Unmap)]
    );
    assert_pairs_nested(&calls);
    assert_eq!(byte(&mm, a), 0);
    assert_eq!(byte(&mm, a + H), 2);
    // Less than a huge page: nothing at all.
    mm.madvise_dontneed(a + H, P).unwrap();
    assert!(starts(&log.take()).is_empty());
    check_accounting(&phys, &[&mm]);
}

#[test]
fn mprotect_sends_its_pair_over_the_vma_part_even_when_nothing_is_mapped() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 2);
    let log = log_of(&mm);
    mm.mprotect(a, H, Prot::READ).unwrap();
    assert_eq!(
        starts(&log.take()),
        vec![pair(a, a + H, Event::ProtectionVma)]
    );
    mm.write(a + H, &[3]).unwrap();
    mm.mprotect(a + H, H, Prot::READ).unwrap();
    assert_eq!(
        starts(&log.take()),
        vec![pair(a + H, a + 2 * H, Event::ProtectionVma)]
    );
    assert!(!mm.pte(a + H).unwrap().write);
    assert!(matches!(
        mm.write(a + H, &[4]),
        Err(Error::Protection { .. })
    ));
    check_accounting(&phys, &[&mm]);
}

#[test]
fn fork_of_private_hugetlb_clears_the_parent_and_cow_copies_a_huge_page() {
    let (phys, parent) = machine(FRAMES);
    let a = private(&parent, 1);
    parent.write(a + 3 * P, &[5]).unwrap();
    let head = frame_at(&parent, a);
    let plog = log_of(&parent);
    let child = parent.fork().unwrap();
    assert_eq!(starts(&plog.take()), vec![pair(a, a + H, Event::Clear)]);
    assert_eq!(frame_at(&child, a), head);
    assert!(!parent.pte(a).unwrap().write && !child.pte(a).unwrap().write);
    check_accounting(&phys, &[&parent, &child]);
    let clog = log_of(&child);
    child.write(a + 3 * P, &[6]).unwrap();
    let calls = clog.take();
    assert_eq!(starts(&calls), vec![pair(a, a + H, Event::Clear)]);
    assert_pairs_nested(&calls);
    assert_ne!(frame_at(&child, a), head, "the child has its own copy");
    assert!(child.is_pmd_mapped(a));
    assert_eq!(byte(&parent, a + 3 * P), 5);
    assert_eq!(byte(&child, a + 3 * P), 6);
    check_accounting(&phys, &[&parent, &child]);
}

#[test]
fn fork_of_shared_hugetlb_shares_the_page_without_a_notifier() {
    let (phys, parent) = machine(FRAMES);
    let a = shared(&parent, 1);
    parent.write(a, &[5]).unwrap();
    let plog = log_of(&parent);
    let child = parent.fork().unwrap();
    assert!(starts(&plog.take()).is_empty());
    child.write(a, &[6]).unwrap();
    assert_eq!(byte(&parent, a), 6, "one page, both mappings");
    let head = frame_at(&parent, a).pfn;
    assert_eq!(frame_at(&child, a).pfn, head);
    // Two mappings plus the hugetlbfs object's reference.
    assert_eq!((phys.mapcount(head), phys.refcount(head)), (2, 3));
    drop(child);
    drop(parent);
    assert_eq!(phys.stats().in_use, 1, "the hugetlbfs object went too");
}

#[test]
fn mremap_moves_the_huge_entries_under_a_clear_pair_and_refuses_growth() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 1);
    mm.write(a, &[9]).unwrap();
    let head = frame_at(&mm, a);
    let log = log_of(&mm);
    let dst = a + 64 * H;
    mm.mremap_fixed(a, H, H, dst).unwrap();
    let s = starts(&log.take());
    // The move, then the munmap of the old range (with its nested pair).
    assert_eq!(s[0], pair(a, a + H, Event::Clear));
    assert_eq!(s[1], pair(a, a + H, Event::Unmap));
    assert_eq!(frame_at(&mm, dst), head);
    assert_eq!(byte(&mm, dst), 9);
    assert!(matches!(
        mm.mremap(dst, H, 2 * H, true),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        mm.mremap_fixed(dst, H, H, dst + 3 * H + P),
        Err(Error::InvalidRange { .. })
    ));
    check_accounting(&phys, &[&mm]);
}

#[test]
fn ranges_in_a_shared_vma_spanning_an_aligned_gigabyte_widen_to_it() {
    let (phys, mm) = machine(FRAMES);
    // 2 GiB of shared hugetlb memory: some 1 GiB-aligned range lies inside.
    let a = shared(&mm, 2 * PUD_SIZE / H);
    let g = a.next_multiple_of(PUD_SIZE);
    assert!(g + PUD_SIZE <= a + 2 * PUD_SIZE);
    let x = g + 5 * H;
    mm.write(x, &[1]).unwrap();
    let log = log_of(&mm);
    mm.madvise_dontneed(x, H).unwrap();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![
            pair(g, g + PUD_SIZE, Event::Clear),
            pair(g, g + PUD_SIZE, Event::Unmap)
        ]
    );
    assert_pairs_nested(&calls);
    // Below the aligned part: not widened.
    if a < g {
        mm.madvise_dontneed(a, H).unwrap();
        assert_eq!(starts(&log.take())[0], pair(a, a + H, Event::Clear));
    }
    // Private memory never is.
    let p = private(&mm, 1);
    mm.madvise_dontneed(p, H).unwrap();
    assert_eq!(starts(&log.take())[0], pair(p, p + H, Event::Clear));
    drop(mm);
    assert_eq!(phys.stats().in_use, 1);
}

#[test]
fn range_fault_reports_order_9_and_pins_reach_the_huge_page() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 1);
    mm.write(a + 2 * P, &[4]).unwrap();
    let pin = mm.pin(a + 2 * P, 1, true).unwrap();
    assert_eq!(pin.frames()[0], frame_at(&mm, a + 2 * P));
    phys.oracle().check_pinned(&pin, a + 2 * P, true).unwrap();
    drop(pin);
    let frames: Vec<_> = (0..HPAGE_PMD_NR)
        .map(|i| frame_at(&mm, a + i * P))
        .collect();
    phys.oracle()
        .check_access_huge(&mm, a, &frames, true)
        .unwrap();
}

#[test]
fn reclaim_ksm_device_migration_exclusive_and_the_oom_reaper_leave_hugetlb_alone() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 1);
    mm.write(a, &[1]).unwrap();
    let head = frame_at(&mm, a);
    let log = log_of(&mm);
    assert_eq!(mm.swap_out(a, H).unwrap(), 0);
    assert_eq!(mm.age(a, H).unwrap(), 0);
    assert_eq!(mm.ksm_merge(a, H).unwrap(), 0);
    assert_eq!(mm.migrate_pages(a, H).unwrap(), 0);
    assert!(mm.migrate_to_device(a, P, Owner(2)).is_err());
    assert_eq!(mm.make_device_exclusive(a, P, None).unwrap(), vec![None]);
    assert!(mm.madvise_free(a, H).is_err());
    mm.clear_soft_dirty();
    let calls = log.take();
    assert_eq!(
        starts(&calls),
        vec![pair(0, END_OF_ADDRESS_SPACE, Event::SoftDirty)],
        "only soft-dirty's pair over everything"
    );
    let report = mm.oom_reap();
    assert!(report.reaped.is_empty());
    assert!(mm.is_pmd_mapped(a) && frame_at(&mm, a) == head);
    check_accounting(&phys, &[&mm]);
}

#[test]
fn exit_nests_an_unmap_pair_per_hugetlb_vma() {
    let (phys, mm) = machine(FRAMES);
    let a = private(&mm, 1);
    mm.write(a, &[1]).unwrap();
    let log = Log::new(&mm);
    // After release only interval notifiers still see invalidations.
    let isub = irec(&mm, &log, a, H);
    drop(mm);
    assert_eq!(
        intervals(&log.take()),
        vec![
            (0, END_OF_ADDRESS_SPACE, Event::Release, None),
            pair(0, END_OF_ADDRESS_SPACE, Event::Unmap),
            pair(a, a + H, Event::Unmap)
        ]
    );
    assert_eq!(phys.stats().in_use, 1);
    isub.remove().unwrap();
}
