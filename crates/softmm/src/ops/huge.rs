//! Transparent huge pages: `MADV_HUGEPAGE`, the THP fault, the PMD split
//! and the THP split, and khugepaged's collapse.
//!
//! A THP is [`HPAGE_PMD_NR`] contiguous frames mapped by one PMD entry
//! (`PageTable` keeps PMD entries apart from PTEs; a page inside one reads
//! as the PTE it implies). Every operation that changes part of a block, or
//! changes what it maps, splits it first, with the hooks Linux v6.6 fires
//! there:
//!
//! | Linux | here | hooks |
//! | --- | --- | --- |
//! | `do_huge_pmd_anonymous_page` | `do_huge_pmd_anonymous_page` | none (a none entry is filled) |
//! | `__split_huge_pmd` (VMA split at an unaligned address, partial zap, COW of a shared THP, FOLL_SPLIT_PMD, a move the PMD cannot follow, reclaim) | `split_huge_pmd` | CLEAR over the block; the PMD's TLB entry is flushed |
//! | `split_huge_page` (partial MADV_FREE, KSM, device migration) | `split_folio` | the PMD split, then CLEAR over the block around its unmap to migration entries; the PTEs come back after the end |
//! | `collapse_huge_page` (khugepaged) | [`Mm::collapse`] | CLEAR over the block around clearing its PTEs; the copy and the new PMD come after the end |
//!
//! The model runs THP in `madvise` mode with `use_zero_page` off: any fault
//! in a suitable block of a `MADV_HUGEPAGE` VMA allocates a THP (falling
//! back to a base page when no aligned run of frames is free).
//!
//! Deliberate differences: a THP split acts on the address space that asked
//! for it (Linux's rmap walk also splits the PMDs of the other processes
//! mapping the THP, such as a fork's, with a CLEAR pair in each; here their
//! PMDs keep mapping the same frames, so what their secondaries may use is
//! unchanged); frames are counted one by one (see
//! [`PhysMem::alloc_huge`](crate::PhysMem::alloc_huge)).

use mmu_notifier::Event;

use crate::error::{Error, Result};
use crate::frame::HPAGE_PMD_NR;
use crate::mm::{check_range, Mm, MmInner, MmapWrite, Ptl};
use crate::pfn::ZERO_PFN;
use crate::pte::{Pte, PteKind};
use crate::trace::Op;
use crate::vma::Vma;
use crate::{PAGE_SIZE, PMD_SIZE};

/// What [`Mm::collapse`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collapse {
    /// The block is now one THP mapped by a PMD.
    Collapsed,
    /// Nothing changed, for the reason given (Linux's `SCAN_*` results).
    Skipped(&'static str),
}

/// Largest number of none or zero-page PTEs a collapse accepts (Linux's
/// default `khugepaged/max_ptes_none`: all but one).
pub const MAX_PTES_NONE: usize = HPAGE_PMD_NR as usize - 1;

/// Largest number of pages mapped elsewhere too a collapse accepts (Linux's
/// default `khugepaged/max_ptes_shared`).
pub const MAX_PTES_SHARED: usize = HPAGE_PMD_NR as usize / 2;

impl MmInner {
    /// Linux `do_huge_pmd_anonymous_page`, under `ptl`: when `addr`'s block
    /// may be a THP and nothing maps any page of it, maps a new THP there
    /// with one PMD entry and returns true. False (fall back to a base
    /// page) when the block is not suitable or no THP can be allocated.
    pub(crate) fn do_huge_pmd_anonymous_page(&self, ptl: &Ptl<'_>, vma: &Vma, addr: u64) -> bool {
        let Some(block) = vma.thp_block(addr) else {
            return false;
        };
        if ptl.get_pmd(block).is_some() || !ptl.ptes_in(block, block + PMD_SIZE).is_empty() {
            return false;
        }
        let Ok(head) = self.phys.alloc_huge() else {
            return false;
        };
        self.phys.map_new_huge(head.pfn);
        // mk_huge_pmd + pmd_mkdirty + maybe_pmd_mkwrite.
        ptl.set_pmd(block, Pte::present(head.pfn, vma.prot.read, vma.prot.write));
        true
    }

    /// A write fault on a read-only PMD mapping (Linux
    /// `do_huge_pmd_wp_page`), with `ptl` held: a THP only this mapping
    /// uses is made writable in place (no notifier); otherwise the PMD is
    /// split (CLEAR over the block) and the fault, retried, copies one base
    /// page.
    pub(crate) fn do_huge_pmd_wp_page(&self, ptl: Ptl<'_>, addr: u64, pte: Pte) {
        let head = ptl.get_pmd(addr).and_then(|p| p.present_pfn());
        let exclusive = head.is_some_and(|h| self.phys.huge_exclusive(h));
        if exclusive {
            let pfn = pte.present_pfn().expect("a PMD maps present pages");
            ptl.set_pte(addr, Pte::present(pfn, true, true));
            return;
        }
        drop(ptl);
        self.split_huge_pmd(addr);
    }

    /// Linux `__split_huge_pmd`: a CLEAR pair over the 2 MiB block of
    /// `addr` around replacing its PMD entry by the PTEs it implies, with
    /// the PMD's TLB entry flushed (`pmdp_invalidate`). The pair is sent
    /// even when the PMD was split meanwhile, as in Linux. Called with the
    /// mmap lock held and without the PTL.
    pub(crate) fn split_huge_pmd(&self, addr: u64) {
        let block = addr & !(PMD_SIZE - 1);
        self.trace
            .record(Op::SplitHugePmd, None, block, block + PMD_SIZE);
        let inv = self.invalidate(Event::Clear, block, block + PMD_SIZE, None);
        {
            let ptl = self.ptl();
            if ptl.split_pmd(block) {
                self.flush_tlb(block, block + PMD_SIZE);
            }
        }
        inv.end();
    }

    /// Linux `split_huge_page` of the THP mapped at `addr`'s block: the PMD
    /// split, then (`unmap_folio` → `try_to_migrate_one`) a CLEAR pair over
    /// the block around replacing its PTEs by migration entries and the TLB
    /// flush; after the end the PTEs are restored (`remap_page`), now
    /// mapping base pages. Accesses meanwhile wait, as on any migration
    /// entry.
    pub(crate) fn split_folio(&self, addr: u64) {
        let block = addr & !(PMD_SIZE - 1);
        let Some(head) = self.pmd_lockless(block).and_then(|p| p.present_pfn()) else {
            return;
        };
        self.split_huge_pmd(block);
        let frozen = {
            let inv = self.invalidate(Event::Clear, block, block + PMD_SIZE, None);
            let ptl = self.ptl();
            let mut frozen = Vec::new();
            for (a, _) in ptl.ptes_in(block, block + PMD_SIZE) {
                let Some(pte) = ptl.pte_offset_map(a) else {
                    continue;
                };
                if pte.present_pfn() == Some(head + (a - block) / PAGE_SIZE) {
                    let pfn = head + (a - block) / PAGE_SIZE;
                    ptl.set_pte(
                        a,
                        Pte {
                            kind: PteKind::Migration { pfn },
                            ..pte
                        },
                    );
                    frozen.push((a, pte));
                }
            }
            if !frozen.is_empty() {
                self.flush_tlb(block, block + PMD_SIZE);
            }
            drop(ptl);
            inv.end();
            frozen
        };
        {
            let ptl = self.ptl();
            for (a, pte) in frozen {
                let pfn = pte.present_pfn().expect("frozen from a present PTE");
                if ptl.get_pte(a).map(|p| p.kind) == Some(PteKind::Migration { pfn }) {
                    ptl.set_pte(a, pte);
                }
            }
        }
        self.migration_done();
    }

    /// Linux `vma_adjust_trans_huge`: before a VMA is split at `start` and
    /// `end`, a PMD mapping either address falls inside (not on its
    /// boundary) is split. Called with the mmap lock held for writing.
    pub(crate) fn split_huge_pmds_at(&self, start: u64, end: u64) {
        for a in [start, end] {
            if a % PMD_SIZE != 0 && self.pmd_lockless(a).is_some() {
                self.split_huge_pmd(a);
            }
        }
    }

    /// The PMD mappings `[start, end)` covers only in part, split (Linux
    /// `zap_pmd_range` and `move_page_tables` meeting a PMD their range
    /// does not cover whole). Returns the blocks it covers whole.
    pub(crate) fn split_partial_huge_pmds(&self, start: u64, end: u64) -> Vec<u64> {
        let mut whole = Vec::new();
        for block in self.pmd_blocks_lockless(start, end) {
            if block < start || block + PMD_SIZE > end {
                self.split_huge_pmd(block);
            } else {
                whole.push(block);
            }
        }
        whole
    }

    /// Every THP mapped by a PMD overlapping `[start, end)` split into base
    /// pages ([`split_folio`](Self::split_folio)).
    pub(crate) fn split_folios_in(&self, start: u64, end: u64) {
        for block in self.pmd_blocks_lockless(start, end) {
            self.split_folio(block);
        }
    }
}

impl MmapWrite<'_> {
    /// Linux `vma_modify` (as mprotect and madvise use it): `[start, end)`
    /// must be covered by VMAs; they are split at its ends (a PMD mapping
    /// an end falls inside is split first, and a hugetlb VMA refuses an
    /// end that is not 2 MiB aligned), then `f` changes each VMA inside.
    /// Traced as `op`.
    ///
    /// # Errors
    /// [`Error::NotMapped`] for a hole, [`Error::InvalidRange`] for a
    /// hugetlb split; nothing is changed then.
    pub(crate) fn modify_vmas(
        &self,
        op: Op,
        start: u64,
        end: u64,
        f: impl FnMut(&mut Vma),
    ) -> Result<()> {
        let mm = self.mm;
        mm.vmas_read().covers(start, end)?;
        mm.check_hugetlb_split(&[start, end])?;
        mm.trace.record(op, None, start, end);
        mm.split_huge_pmds_at(start, end);
        mm.vmas_write().update_range(start, end, f);
        Ok(())
    }
}

impl Mm {
    /// `madvise(MADV_HUGEPAGE)` over `[addr, addr + len)`: later faults in
    /// its 2 MiB-aligned blocks that lie inside one such VMA allocate
    /// transparent huge pages, mapped by one PMD entry each. VMAs are split
    /// at the range's ends (splitting a PMD mapping either end falls
    /// inside).
    ///
    /// # Errors
    /// [`Error::InvalidRange`]; [`Error::NotMapped`] if part of the range
    /// has no VMA (Linux `-ENOMEM`; nothing is changed).
    pub fn madvise_hugepage(&self, addr: u64, len: u64) -> Result<()> {
        self.set_hugepage(addr, len, true)
    }

    /// `madvise(MADV_NOHUGEPAGE)`: no new THP in the range; THPs already
    /// there stay.
    ///
    /// # Errors
    /// As [`madvise_hugepage`](Self::madvise_hugepage).
    pub fn madvise_nohugepage(&self, addr: u64, len: u64) -> Result<()> {
        self.set_hugepage(addr, len, false)
    }

    fn set_hugepage(&self, addr: u64, len: u64, on: bool) -> Result<()> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_write();
        g.modify_vmas(Op::MadviseHugepage, start, end, |v| v.hugepage = on)
    }

    /// Whether a PMD entry maps the page at `addr` (a transparent huge
    /// page), as the hardware walker sees it now.
    pub fn is_pmd_mapped(&self, addr: u64) -> bool {
        self.inner.pmd_lockless(addr).is_some()
    }

    /// khugepaged's collapse of the 2 MiB block of `addr` (Linux
    /// `hpage_collapse_scan_pmd` + `collapse_huge_page`), under the mmap
    /// lock held for writing: when the block may be a THP and its PTEs
    /// qualify, a CLEAR pair over the block surrounds clearing every PTE of
    /// it and the TLB flush; after the end the contents are copied into a
    /// new THP, one PMD entry maps it writable, and the old frames are
    /// released.
    ///
    /// A block qualifies when every PTE is none, the zero page or a present
    /// system page (no swap, device or migration entry, no KSM page, no
    /// pin or other extra reference), at most [`MAX_PTES_NONE`] are none or
    /// the zero page, at most [`MAX_PTES_SHARED`] are mapped elsewhere too,
    /// and one is writable.
    ///
    /// # Errors
    /// [`Error::InvalidRange`] for an address outside user space;
    /// [`Error::NotMapped`] when no VMA holds it; [`Error::Exited`] and
    /// [`Error::OomReaped`]. A block that does not qualify is
    /// [`Collapse::Skipped`], not an error.
    pub fn collapse(&self, addr: u64) -> Result<Collapse> {
        let block = addr & !(PMD_SIZE - 1);
        check_range(block, PMD_SIZE)?;
        let g = self.mmap_write();
        let mm = g.mm;
        mm.check_usable()?;
        let vma = mm.vmas_read().find(addr).cloned().ok_or(Error::NotMapped {
            addr,
            why: "no VMA",
        })?;
        if vma.thp_block(addr).is_none() {
            return Ok(Collapse::Skipped(
                "the block is not inside one private MADV_HUGEPAGE VMA",
            ));
        }
        if mm.pmd_lockless(block).is_some() {
            return Ok(Collapse::Skipped("already a THP"));
        }
        let old = mm.ptes_lockless(block, block + PMD_SIZE);
        if let Err(why) = collapse_scan(mm, &old) {
            return Ok(Collapse::Skipped(why));
        }
        let Ok(new) = mm.phys.alloc_huge() else {
            return Ok(Collapse::Skipped("no huge page free"));
        };
        mm.trace.record(Op::Collapse, None, block, block + PMD_SIZE);
        let inv = mm.invalidate(Event::Clear, block, block + PMD_SIZE, None);
        let cleared = {
            // pmdp_collapse_flush: the page table leaves the walker's view.
            let ptl = mm.ptl();
            let cleared: Vec<(u64, Pte)> = ptl
                .ptes_in(block, block + PMD_SIZE)
                .into_iter()
                .filter_map(|(a, _)| ptl.clear_pte(a).map(|p| (a, p)))
                .collect();
            mm.flush_tlb(block, block + PMD_SIZE);
            cleared
        };
        inv.end();
        // __collapse_huge_page_copy: the old pages' contents (none and the
        // zero page read as zeros), then the old pages go.
        for (a, pte) in &cleared {
            if let Some(pfn) = pte.present_pfn().filter(|&p| p != ZERO_PFN) {
                mm.phys.copy_frame(pfn, new.pfn + (a - block) / PAGE_SIZE);
            }
        }
        mm.phys.map_new_huge(new.pfn);
        {
            let ptl = mm.ptl();
            ptl.set_pmd(block, Pte::present(new.pfn, vma.prot.read, vma.prot.write));
        }
        for (_, pte) in cleared {
            if let Some(pfn) = pte.maps_frame() {
                mm.phys.unmap(pfn);
            }
        }
        Ok(Collapse::Collapsed)
    }
}

/// Linux `hpage_collapse_scan_pmd` over the PTEs of one block (`ptes`, the
/// present ones in address order): whether a collapse may go ahead.
fn collapse_scan(mm: &MmInner, ptes: &[(u64, Pte)]) -> std::result::Result<(), &'static str> {
    let mut none_or_zero = HPAGE_PMD_NR as usize - ptes.len();
    let mut shared = 0;
    let mut writable = false;
    for (_, pte) in ptes {
        let PteKind::Present { pfn } = pte.kind else {
            return Err("a swap, device or migration entry in the block");
        };
        if pfn == ZERO_PFN {
            none_or_zero += 1;
            continue;
        }
        if !mm.phys.is_system(pfn) || mm.phys.is_ksm(pfn) {
            return Err("a KSM or device page in the block");
        }
        let (maps, refs) = (mm.phys.mapcount(pfn), mm.phys.refcount(pfn));
        if refs != maps || mm.phys.pincount(pfn) > 0 {
            return Err("a page with an extra reference (pinned or in use)");
        }
        shared += usize::from(maps > 1);
        writable |= pte.write;
    }
    if none_or_zero > MAX_PTES_NONE {
        return Err("too many none or zero-page entries");
    }
    if shared > MAX_PTES_SHARED {
        return Err("too many shared pages");
    }
    if !writable {
        return Err("no writable page");
    }
    Ok(())
}
