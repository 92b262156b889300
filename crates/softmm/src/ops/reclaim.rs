//! Reclaim: aging (the young callbacks) and unmapping for swap-out.

use mmu_notifier::Event;

use crate::error::Result;
use crate::frame::HPAGE_PMD_NR;
use crate::mm::{Mm, MmInner, Ptl};
use crate::pfn::ZERO_PFN;
use crate::pte::{Pte, PteKind};
use crate::trace::Op;
use crate::vma::Vma;
use crate::{PAGE_SIZE, PMD_SIZE};

impl MmInner {
    /// Linux `ptep_clear_flush_young_notify` (with `flush`) or
    /// `ptep_clear_young_notify`, and their PMD forms, under `ptl`: the
    /// accessed bit of `entry`, the entry at `addr` mapping `len` bytes, is
    /// tested and cleared (with a TLB flush of its range if it was set and
    /// `flush`), then the notifiers' young callback over the same range is
    /// ORed in. Whether the entry was referenced.
    fn clear_young_notify(
        &self,
        ptl: &Ptl<'_>,
        addr: u64,
        len: u64,
        mut entry: Pte,
        flush: bool,
    ) -> bool {
        let mut young = entry.young;
        if young {
            entry.young = false;
            ptl.set_pte(addr, entry);
            if flush {
                self.flush_tlb(addr, addr + len);
            }
        }
        young |= if flush {
            self.subs.clear_flush_young(addr, addr + len)
        } else {
            self.subs.clear_young(addr, addr + len)
        };
        young
    }

    /// After the private page `pfn` that `cur` mapped at `a` was cleared
    /// and flushed: its content moves to a new swap slot that the PTE then
    /// points at, unless it was lazily freed and is still clean (then it is
    /// discarded and the PTE stays none).
    fn swap_entry(&self, ptl: &Ptl<'_>, a: u64, cur: Pte, pfn: u64) {
        if self.phys.is_lazyfree(pfn) && !cur.dirty {
            return;
        }
        let slot = self.phys.swap_out(self.phys.content(pfn));
        ptl.set_pte(
            a,
            Pte {
                kind: PteKind::Swap { slot },
                ..cur
            },
        );
    }

    /// Reclaim of the THP mapped at `block` (Linux `shrink_folio_list` →
    /// `try_to_unmap` with `TTU_SPLIT_HUGE_PMD`; the THP is swapped out
    /// whole): the PMD split (a CLEAR pair over the block), then a CLEAR
    /// pair over the THP's range around clearing its PTEs, the TLB flush
    /// and, for private memory, the swap entries; the frames are released
    /// after the end. A THP with a pinned page is left alone. Returns the
    /// pages unmapped.
    fn swap_out_thp(&self, block: u64, private: bool) -> usize {
        let Some(head) = self.pmd_lockless(block).and_then(|p| p.present_pfn()) else {
            return 0;
        };
        if self.phys.huge_pinned(head) {
            return 0;
        }
        self.split_huge_pmd(block);
        let inv = self.invalidate(Event::Clear, block, block + PMD_SIZE, None);
        let released = {
            let ptl = self.ptl();
            let mut cleared = Vec::new();
            for (a, cur) in ptl.ptes_in(block, block + PMD_SIZE) {
                let pfn = head + (a - block) / PAGE_SIZE;
                if ptl.pte_offset_map(a).map(|p| p.kind) == Some(PteKind::Present { pfn }) {
                    ptl.clear_pte(a);
                    cleared.push((a, cur, pfn));
                }
            }
            if !cleared.is_empty() {
                self.flush_tlb(block, block + PMD_SIZE);
            }
            if private {
                for &(a, cur, pfn) in &cleared {
                    self.swap_entry(&ptl, a, cur, pfn);
                }
            }
            cleared
        };
        inv.end();
        for &(_, _, pfn) in &released {
            self.phys.unmap(pfn);
        }
        released.len()
    }
}

impl Mm {
    /// Reclaim aging (Linux `folio_referenced_one` →
    /// `ptep_clear_flush_young_notify`): for each present page, under the
    /// PTL, test and clear the accessed bit, flush if it was set, and OR in
    /// the notifiers' `clear_flush_young` for that page; a PMD mapping is
    /// one entry (`pmdp_clear_flush_young_notify` over its 2 MiB block).
    /// Returns the number of pages found referenced (a PMD mapping counts
    /// as its 512 pages).
    ///
    /// # Errors
    /// [`Error::InvalidRange`](crate::Error::InvalidRange).
    pub fn age(&self, addr: u64, len: u64) -> Result<usize> {
        self.young_walk(addr, len, true)
    }

    /// Idle-page tracking and DAMON (Linux `ptep_clear_young_notify`): like
    /// [`age`](Self::age) but without TLB flush, calling `clear_young`.
    ///
    /// # Errors
    /// [`Error::InvalidRange`](crate::Error::InvalidRange).
    pub fn clear_young(&self, addr: u64, len: u64) -> Result<usize> {
        self.young_walk(addr, len, false)
    }

    fn young_walk(&self, addr: u64, len: u64, flush: bool) -> Result<usize> {
        let (g, start, end) = self.read_op(Op::Age, addr, len)?;
        let mm = g.mm;
        let mut referenced = 0;
        let mut done_block = None;
        // hugetlb pages are not on the LRU: reclaim never ages them.
        let hugetlb = mm.vmas_read().ranges(start, end, Vma::is_hugetlb);
        for (a, _) in mm.ptes_lockless(start, end) {
            let block = a & !(PMD_SIZE - 1);
            if done_block == Some(block) || hugetlb.iter().any(|&(s, e)| s <= a && a < e) {
                continue;
            }
            let ptl = mm.ptl();
            if let Some(pmd) = ptl.get_pmd(a) {
                // pmdp_clear_flush_young_notify / pmdp_clear_young_notify:
                // one PMD entry, its whole block.
                done_block = Some(block);
                if mm.clear_young_notify(&ptl, block, PMD_SIZE, pmd, flush) {
                    referenced += HPAGE_PMD_NR as usize;
                }
                continue;
            }
            let Some(pte) = ptl.get_pte(a) else {
                continue;
            };
            if !matches!(pte.kind, PteKind::Present { .. }) || pte.is_zero() {
                continue;
            }
            referenced += usize::from(mm.clear_young_notify(&ptl, a, PAGE_SIZE, pte, flush));
        }
        Ok(referenced)
    }

    /// khugepaged / DAMON's "is this page referenced?" (Linux
    /// `pte_young(pte) || mmu_notifier_test_young`): nothing is cleared.
    pub fn test_young(&self, addr: u64) -> bool {
        let g = self.mmap_read();
        let mm = g.mm;
        let addr = addr & !(PAGE_SIZE - 1);
        let ptl = mm.ptl();
        let pte_young = ptl.get_pte(addr).is_some_and(|p| p.young);
        pte_young || mm.subs.test_young(addr)
    }

    /// Reclaim unmap (Linux `try_to_unmap_one`): for each present page, a
    /// CLEAR pair of that page around clear + flush. Private pages move to
    /// swap (or are discarded when lazily freed and clean) and their frame is
    /// released after the end; shared pages stay in their object. Pinned
    /// pages and device memory are skipped. Returns the pages unmapped.
    ///
    /// # Errors
    /// [`Error::InvalidRange`](crate::Error::InvalidRange).
    pub fn swap_out(&self, addr: u64, len: u64) -> Result<usize> {
        let (g, start, end) = self.read_op(Op::SwapOut, addr, len)?;
        let mm = g.mm;
        let mut unmapped = 0;
        let vmas = mm.vmas_read().overlapping(start, end);
        for v in vmas {
            if v.is_hugetlb() {
                // hugetlb pages are never swapped.
                continue;
            }
            for block in mm.pmd_blocks_lockless(v.start, v.end) {
                unmapped += mm.swap_out_thp(block, v.is_private());
            }
            for (a, pte) in mm.ptes_lockless(v.start, v.end) {
                let Some(pfn) = pte.present_pfn().filter(|&p| p != ZERO_PFN) else {
                    continue;
                };
                if !mm.phys.is_system(pfn) || mm.phys.pincount(pfn) > 0 {
                    continue;
                }
                let inv = mm.invalidate(Event::Clear, a, a + PAGE_SIZE, None);
                let released = {
                    let ptl = mm.ptl();
                    match ptl.pte_offset_map(a) {
                        Some(cur) if cur.kind == PteKind::Present { pfn } => {
                            ptl.clear_pte(a);
                            mm.flush_tlb(a, a + PAGE_SIZE);
                            if v.is_private() {
                                mm.swap_entry(&ptl, a, cur, pfn);
                            }
                            true
                        }
                        _ => false,
                    }
                };
                inv.end();
                if released {
                    mm.phys.unmap(pfn);
                    unmapped += 1;
                }
            }
        }
        Ok(unmapped)
    }
}
