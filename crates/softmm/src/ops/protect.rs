//! Protection changes: mprotect, fork's write-protect, soft-dirty clear and
//! writeback cleaning.

use mmu_notifier::{Event, END_OF_ADDRESS_SPACE};

use crate::error::Result;
use crate::frame::HPAGE_PMD_NR;
use crate::mm::{check_range, Mm, MmInner, MmapWrite, Ptl, TASK_SIZE};
use crate::pfn::ZERO_PFN;
use crate::pte::{Pte, PteKind};
use crate::trace::Op;
use crate::vma::{Prot, Vma};
use crate::{PAGE_SIZE, PMD_SIZE, PUD_SIZE};

impl MmapWrite<'_> {
    /// Linux `change_protection` over one VMA part: per PUD-sized range, a
    /// PROTECTION_VMA pair started lazily at the first populated PMD, over
    /// `[that address, end of the PUD range)`. A method of the mmap write
    /// lock, which it needs.
    fn change_protection(&self, start: u64, end: u64, prot: Prot) {
        let mm = self.mm;
        let mut addr = start;
        while addr < end {
            let pud_end = ((addr | (PUD_SIZE - 1)) + 1).min(end);
            let first = mm.ptes_lockless(addr, pud_end).first().map(|&(a, _)| a);
            if let Some(first) = first {
                let rstart = addr.max(first & !(PMD_SIZE - 1));
                let inv = mm.invalidate(Event::ProtectionVma, rstart, pud_end, None);
                {
                    let ptl = mm.ptl();
                    for (a, mut pte) in ptl.ptes_in(rstart, pud_end) {
                        if matches!(pte.kind, PteKind::Swap { .. }) {
                            continue;
                        }
                        pte.read = prot.read;
                        pte.write = pte.write && prot.write;
                        ptl.set_pte(a, pte);
                    }
                    mm.flush_tlb(rstart, pud_end);
                }
                inv.end();
            }
            addr = pud_end;
        }
    }
}

/// Linux `copy_huge_pmd` (both PTLs held): the parent's PMD entry is
/// write-protected and the child maps the same THP with an old,
/// write-protected PMD entry. Returns whether the parent's entry was
/// writable.
fn copy_huge_pmd(mm: &MmInner, ptl: &Ptl<'_>, child_ptl: &Ptl<'_>, block: u64) -> bool {
    let Some(mut head) = ptl.get_pmd(block) else {
        return false;
    };
    let pfn = head.present_pfn().expect("a PMD maps a present THP");
    for p in pfn..pfn + HPAGE_PMD_NR {
        mm.phys.map(p);
    }
    let was_writable = head.write;
    head.write = false;
    ptl.set_pte(block, head);
    child_ptl.set_pmd(
        block,
        Pte {
            young: false,
            ..head
        },
    );
    was_writable
}

impl Mm {
    /// Changes the protection of `[addr, addr + len)` (Linux `mprotect`):
    /// VMAs are split at the range's ends, then per VMA the PTEs change under
    /// PROTECTION_VMA pairs (see [`PUD_SIZE`]: one pair per PUD range that
    /// has content). Adding write permission leaves PTEs read-only; the
    /// next write fault upgrades them.
    ///
    /// # Errors
    /// [`Error::InvalidRange`](crate::Error::InvalidRange); [`Error::NotMapped`](crate::Error::NotMapped) if part of the range has
    /// no VMA (nothing is changed).
    pub fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_write();
        let mm = g.mm;
        g.modify_vmas(Op::Mprotect, start, end, |v| v.prot = prot)?;
        let parts = mm.vmas_read().overlapping(start, end);
        for v in parts {
            if v.is_hugetlb() {
                g.hugetlb_change_protection(&v, prot);
            } else {
                g.change_protection(v.start, v.end, prot);
            }
        }
        Ok(())
    }

    /// Forks the address space (Linux `dup_mmap`): the child gets every VMA.
    /// For private VMAs that have anonymous pages, a PROTECTION_PAGE pair on
    /// the **parent** over the whole VMA surrounds the copy, in which the
    /// parent's writable PTEs are write-protected and the child maps the
    /// same frames read-only (COW). Pinned pages are copied for the child at
    /// once (Linux `page_needs_cow_for_dma`), so the pin stays coherent.
    /// Shared mappings are not copied (the child faults them in) and get no
    /// notification. The parent's TLB is flushed after all VMAs are copied.
    ///
    /// # Errors
    /// [`Error::OomReaped`](crate::Error::OomReaped); [`Error::OutOfMemory`](crate::Error::OutOfMemory) while copying pinned
    /// pages (the partial child is torn down).
    pub fn fork(&self) -> Result<Mm> {
        let g = self.mmap_write();
        let mm = g.mm;
        mm.check_usable()?;
        mm.trace.record(Op::Fork, None, 0, TASK_SIZE);
        let child = Mm::new(&mm.phys);
        let vmas: Vec<_> = mm.vmas_read().all().cloned().collect();
        let mut protected = false;
        for v in vmas {
            child.inner.vmas_write().insert(v.clone());
            if v.is_hugetlb() {
                match self.copy_hugetlb_page_range(&child, &v) {
                    Ok(p) => protected |= p,
                    Err(e) => {
                        if protected {
                            mm.flush_tlb(0, END_OF_ADDRESS_SPACE);
                        }
                        return Err(e);
                    }
                }
                continue;
            }
            if !(v.is_private() && v.anon_vma) {
                continue;
            }
            let inv = mm.invalidate(Event::ProtectionPage, v.start, v.end, None);
            // copy_huge_pmd: a THP that may be pinned is split in the
            // parent (its own CLEAR pair, nested) and copied as PTEs.
            for block in mm.pmd_blocks_lockless(v.start, v.end) {
                let head = mm.pmd_lockless(block).and_then(|p| p.present_pfn());
                if head.is_some_and(|h| mm.phys.huge_pinned(h)) {
                    mm.split_huge_pmd(block);
                }
            }
            let copied = {
                // Both page tables' locks, as copy_pte_range takes them.
                let ptl = mm.ptl();
                let child_ptl = child.inner.ptl();
                for block in mm.pmd_blocks_lockless(v.start, v.end) {
                    protected |= copy_huge_pmd(mm, &ptl, &child_ptl, block);
                }
                let mut res = Ok(());
                for (a, pte) in ptl.ptes_in(v.start, v.end) {
                    if ptl.get_pmd(a).is_some() {
                        continue;
                    }
                    match self.copy_pte(&ptl, &child_ptl, a, pte) {
                        Ok(p) => protected |= p,
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                res
            };
            inv.end();
            if let Err(e) = copied {
                if protected {
                    mm.flush_tlb(0, END_OF_ADDRESS_SPACE);
                }
                return Err(e);
            }
        }
        if protected {
            mm.flush_tlb(0, END_OF_ADDRESS_SPACE);
        }
        Ok(child)
    }

    /// Copies one PTE of a COW mapping from the parent's page table (under
    /// `ptl`) into the child's (under `child_ptl`). Returns whether the
    /// parent's PTE was write-protected.
    fn copy_pte(&self, ptl: &Ptl<'_>, child_ptl: &Ptl<'_>, a: u64, pte: Pte) -> Result<bool> {
        let mm = &self.inner;
        let mut parent = pte;
        if let PteKind::DeviceExclusive { pfn, .. } = pte.kind {
            // try_restore_exclusive_pte: the parent gets its normal PTE
            // back; the PROTECTION_PAGE start already told the device.
            parent.kind = PteKind::Present { pfn };
        }
        let child_pte = match parent.kind {
            PteKind::Swap { slot } => {
                mm.phys.swap_dup(slot);
                parent
            }
            PteKind::Migration { .. } => return Ok(false), // excluded by the mmap lock
            PteKind::Present { pfn }
                if pfn != ZERO_PFN && mm.phys.is_system(pfn) && mm.phys.pincount(pfn) > 0 =>
            {
                // A pinned page is copied for the child now.
                let new = mm.phys.alloc_frame()?;
                mm.phys.copy_frame(pfn, new.pfn);
                mm.phys.map(new.pfn);
                mm.phys.put_frame(new.pfn);
                ptl.set_pte(a, parent);
                child_ptl.set_pte(
                    a,
                    Pte {
                        kind: PteKind::Present { pfn: new.pfn },
                        ..parent
                    },
                );
                return Ok(false);
            }
            _ => {
                if let Some(pfn) = parent.maps_frame() {
                    mm.phys.map(pfn);
                }
                let was_writable = parent.write;
                parent.write = false;
                ptl.set_pte(a, parent);
                child_ptl.set_pte(a, parent);
                return Ok(was_writable || pte != parent);
            }
        };
        child_ptl.set_pte(a, child_pte);
        Ok(false)
    }

    /// Clears the soft-dirty bits of the whole address space (Linux
    /// `clear_refs` type 4): a SOFT_DIRTY pair over `[0, END)` around
    /// write-protecting every present PTE and clearing its soft-dirty bit;
    /// the TLB (and so the secondary TLBs) is flushed after the end.
    pub fn clear_soft_dirty(&self) {
        let g = self.mmap_read();
        let mm = g.mm;
        mm.trace.record(Op::SoftDirtyClear, None, 0, TASK_SIZE);
        let inv = mm.invalidate(Event::SoftDirty, 0, END_OF_ADDRESS_SPACE, None);
        // clear_refs walks no hugetlb VMA.
        let hugetlb = mm.vmas_read().ranges(0, TASK_SIZE, Vma::is_hugetlb);
        {
            let ptl = mm.ptl();
            for (a, mut pte) in ptl.ptes_in(0, TASK_SIZE) {
                if hugetlb.iter().any(|&(s, e)| s <= a && a < e) {
                    continue;
                }
                pte.soft_dirty = false;
                if matches!(pte.kind, PteKind::Present { .. }) {
                    pte.write = false;
                }
                ptl.set_pte(a, pte);
            }
        }
        inv.end();
        let _ptl = mm.ptl();
        mm.flush_tlb(0, END_OF_ADDRESS_SPACE);
    }

    /// Writeback cleaning of shared pages (Linux `page_vma_mkclean_one`):
    /// for each dirty page of a shared mapping in the range, a
    /// PROTECTION_PAGE pair of that page around clear + flush + set
    /// read-only and clean. Returns the pages cleaned.
    ///
    /// # Errors
    /// [`Error::InvalidRange`](crate::Error::InvalidRange).
    pub fn writeback(&self, addr: u64, len: u64) -> Result<usize> {
        let (g, start, end) = self.read_op(Op::Writeback, addr, len)?;
        let mm = g.mm;
        let mut cleaned = 0;
        let vmas = mm.vmas_read().overlapping(start, end);
        for v in vmas {
            if v.is_private() || v.is_hugetlb() {
                continue;
            }
            for (a, pte) in mm.ptes_lockless(v.start, v.end) {
                if !(pte.dirty || pte.write) || pte.present_pfn().is_none() {
                    continue;
                }
                let inv = mm.invalidate(Event::ProtectionPage, a, a + PAGE_SIZE, None);
                {
                    let ptl = mm.ptl();
                    if let Some(mut cur) = ptl.get_pte(a).filter(|c| c.kind == pte.kind) {
                        ptl.clear_pte(a);
                        mm.flush_tlb(a, a + PAGE_SIZE);
                        cur.write = false;
                        cur.dirty = false;
                        ptl.set_pte(a, cur);
                        cleaned += 1;
                    }
                }
                inv.end();
            }
        }
        Ok(cleaned)
    }
}
