//! Reclaim: aging (the young callbacks) and unmapping for swap-out.

use mmu_notifier::Event;

use crate::error::Result;
use crate::mm::Mm;
use crate::pfn::ZERO_PFN;
use crate::pte::{Pte, PteKind};
use crate::trace::Op;
use crate::PAGE_SIZE;

impl Mm {
    /// Reclaim aging (Linux `folio_referenced_one` →
    /// `ptep_clear_flush_young_notify`): for each present page, under the
    /// PTL, test and clear the accessed bit, flush if it was set, and OR in
    /// the notifiers' `clear_flush_young` for that page. Returns the number
    /// of pages found referenced.
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
        for (a, _) in mm.ptes_lockless(start, end) {
            let ptl = mm.ptl();
            let Some(mut pte) = ptl.get_pte(a) else {
                continue;
            };
            if !matches!(pte.kind, PteKind::Present { .. }) || pte.is_zero() {
                continue;
            }
            let mut young = pte.young;
            if young {
                pte.young = false;
                ptl.set_pte(a, pte);
                if flush {
                    mm.flush_tlb(a, a + PAGE_SIZE);
                }
            }
            young |= if flush {
                mm.subs.clear_flush_young(a, a + PAGE_SIZE)
            } else {
                mm.subs.clear_young(a, a + PAGE_SIZE)
            };
            referenced += usize::from(young);
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
                    match ptl.get_pte(a) {
                        Some(cur) if cur.kind == PteKind::Present { pfn } => {
                            ptl.clear_pte(a);
                            mm.flush_tlb(a, a + PAGE_SIZE);
                            if v.is_private() {
                                let discard = mm.phys.is_lazyfree(pfn) && !cur.dirty;
                                if !discard {
                                    let slot = mm.phys.swap_out(mm.phys.content(pfn));
                                    ptl.set_pte(
                                        a,
                                        Pte {
                                            kind: PteKind::Swap { slot },
                                            ..cur
                                        },
                                    );
                                }
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
