//! hugetlb: `MAP_HUGETLB` mappings of fixed 2 MiB pages, each mapped by
//! one PMD entry that is never split, with the hooks of Linux v6.6's
//! `mm/hugetlb.c`:
//!
//! | Linux | here | hooks |
//! | --- | --- | --- |
//! | `hugetlb_no_page` | `MmInner::hugetlb_fault` | none (a none entry is filled; a private read fault maps read-only) |
//! | `hugetlb_wp` (COW) | `MmInner::hugetlb_wp` | CLEAR over the huge page around clear, flush, set |
//! | `__unmap_hugepage_range` (munmap, exit, `MADV_DONTNEED`) | `MmInner::unmap_hugepage_range` | UNMAP over the VMA part, widened for PMD sharing, nested in the caller's pair |
//! | `hugetlb_change_protection` (mprotect) | `MmapWrite::hugetlb_change_protection` | PROTECTION_VMA over the VMA part, widened, always sent |
//! | `copy_hugetlb_page_range` (fork) | `Mm::copy_hugetlb_page_range` | CLEAR on the parent over the VMA when private (COW) |
//! | `move_hugetlb_page_tables` (mremap) | `MmapWrite::move_hugetlb_page_tables` | CLEAR over the old range, widened |
//!
//! "Widened for PMD sharing" is Linux's
//! `adjust_range_if_pmd_sharing_possible`: in a shared hugetlb VMA that
//! spans a whole 1 GiB-aligned range, page tables may be shared between
//! processes, so a range touching it grows to 1 GiB boundaries (the model
//! shares no page tables; it sends the ranges Linux sends).
//!
//! A VMA split at an address that is not 2 MiB aligned (munmap, mprotect,
//! madvise, a fixed mmap over part of it) is refused with
//! [`Error::InvalidRange`], as Linux's `hugetlb_vm_op_split` refuses it.
//! hugetlb pages are not swapped, merged, aged, migrated to a device or
//! made device-exclusive; the OOM reaper and soft-dirty skip them.

use mmu_notifier::Event;

use crate::error::{Error, Result};
use crate::frame::HPAGE_PMD_NR;
use crate::mm::{Gather, Mm, MmInner, MmapWrite, Ptl};
use crate::pte::{satisfies, Access, Pte};
use crate::trace::Op;
use crate::vma::{Backing, Prot, Vma};
use crate::{PMD_SIZE, PUD_SIZE};

/// Linux `adjust_range_if_pmd_sharing_possible`: `[start, end)` grown to
/// 1 GiB boundaries where it touches the 1 GiB-aligned part of a shared
/// hugetlb VMA (whose page tables may be shared).
pub(crate) fn adjust_range_if_pmd_sharing_possible(vma: &Vma, start: u64, end: u64) -> (u64, u64) {
    let shared = matches!(vma.backing, Backing::Hugetlb(Some(_)));
    let v_start = vma.start.next_multiple_of(PUD_SIZE);
    let v_end = vma.end & !(PUD_SIZE - 1);
    if !shared || v_end <= v_start || end <= v_start || start >= v_end {
        return (start, end);
    }
    let s = if start > v_start {
        start & !(PUD_SIZE - 1)
    } else {
        start
    };
    let e = if end < v_end {
        end.next_multiple_of(PUD_SIZE)
    } else {
        end
    };
    (s, e)
}

impl MmInner {
    /// Linux `hugetlb_vm_op_split`: a VMA change at each of `addrs` that
    /// falls inside a hugetlb VMA must be 2 MiB aligned.
    pub(crate) fn check_hugetlb_split(&self, addrs: &[u64]) -> Result<()> {
        let vmas = self.vmas_read();
        for &a in addrs {
            let inside = vmas.find(a).filter(|v| v.is_hugetlb() && v.start != a);
            if inside.is_some() && a % PMD_SIZE != 0 {
                return Err(Error::InvalidRange { addr: a, len: 0 });
            }
        }
        Ok(())
    }

    /// Linux `hugetlb_fault` for `addr` of the hugetlb `vma`, with the
    /// mmap lock held for reading: a none entry gets a huge page (a new
    /// zeroed one for private memory, the object's for shared; a private
    /// read fault maps it read-only); a write to a read-only private page
    /// another mapping shares copies it (`hugetlb_wp`); otherwise the
    /// entry's bits are updated.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when no huge page is free (Linux: SIGBUS).
    pub(crate) fn hugetlb_fault(&self, vma: &Vma, addr: u64, access: Access) -> Result<()> {
        let haddr = addr & !(PMD_SIZE - 1);
        let ptl = self.ptl();
        let Some(pmd) = ptl.get_pmd(haddr) else {
            return self.hugetlb_no_page(&ptl, vma, haddr, access);
        };
        if satisfies(&pmd, access) || !access.is_write() {
            let mut p = pmd;
            p.young = true;
            p.read = vma.prot.read;
            if access.is_write() {
                p.dirty = true;
                p.soft_dirty = true;
            }
            ptl.set_pte(haddr, p);
            return Ok(());
        }
        let head = pmd.present_pfn().expect("a hugetlb PMD maps a page");
        let exclusive =
            matches!(vma.backing, Backing::Hugetlb(None)) && self.phys.huge_exclusive(head);
        if exclusive || matches!(vma.backing, Backing::Hugetlb(Some(_))) {
            // Reuse (the only mapping of an anonymous page), or a shared
            // page: made writable in place, no notifier.
            ptl.set_pte(haddr, Pte::present(head, vma.prot.read, true));
            return Ok(());
        }
        drop(ptl);
        self.hugetlb_wp(vma, haddr, pmd)
    }

    /// Linux `hugetlb_no_page`, under `ptl`.
    fn hugetlb_no_page(&self, ptl: &Ptl<'_>, vma: &Vma, haddr: u64, access: Access) -> Result<()> {
        let (head, write) = match &vma.backing {
            Backing::Hugetlb(Some(obj)) => {
                let idx = vma.pgoff_of(haddr) / HPAGE_PMD_NR;
                let head = obj.huge_page(idx)?;
                for pfn in head..head + HPAGE_PMD_NR {
                    self.phys.map(pfn);
                }
                (head, vma.prot.write)
            }
            _ => {
                let head = self.phys.alloc_huge()?.pfn;
                self.phys.map_new_huge(head);
                (head, access.is_write() && vma.prot.write)
            }
        };
        let mut pmd = Pte::present(head, vma.prot.read, write);
        pmd.dirty = access.is_write();
        ptl.set_pmd(haddr, pmd);
        Ok(())
    }

    /// Linux `hugetlb_wp`: a copy of the huge page, then a CLEAR pair over
    /// it around clearing the entry, the flush and the new entry; the old
    /// page's mapping references go after the end.
    fn hugetlb_wp(&self, vma: &Vma, haddr: u64, old: Pte) -> Result<()> {
        let old_head = old.present_pfn().expect("COW of a present page");
        let new = self.phys.alloc_huge()?;
        self.phys.copy_huge(old_head, new.pfn);
        self.trace
            .record(Op::CowFault, None, haddr, haddr + PMD_SIZE);
        let inv = self.invalidate(Event::Clear, haddr, haddr + PMD_SIZE, None);
        let replaced = {
            let ptl = self.ptl();
            let same = ptl.get_pmd(haddr).and_then(|p| p.present_pfn()) == Some(old_head);
            if same {
                ptl.clear_pmd(haddr);
                self.flush_tlb(haddr, haddr + PMD_SIZE);
                for pfn in new.pfn..new.pfn + HPAGE_PMD_NR {
                    self.phys.map(pfn);
                }
                ptl.set_pmd(haddr, Pte::present(new.pfn, vma.prot.read, true));
            }
            same
        };
        inv.end();
        for i in 0..HPAGE_PMD_NR {
            // The allocation's references (the mapping holds its own).
            self.phys.put_frame(new.pfn + i);
            if replaced {
                self.phys.unmap(old_head + i);
            }
        }
        Ok(())
    }

    /// Linux `__unmap_hugepage_range`: an UNMAP pair over `[start, end)`
    /// of `vma` (widened for PMD sharing as `vma` allows), nested in the
    /// caller's pair, around zapping its huge pages into `gather`.
    pub(crate) fn unmap_hugepage_range(
        &self,
        gather: &mut Gather<'_>,
        vma: &Vma,
        start: u64,
        end: u64,
    ) {
        let (s, e) = adjust_range_if_pmd_sharing_possible(vma, start, end);
        let inv = self.invalidate(Event::Unmap, s, e, None);
        {
            let ptl = self.ptl();
            for block in self.pmd_blocks_lockless(start, end) {
                gather.zap(&ptl, block);
            }
        }
        inv.end();
    }
}

impl MmapWrite<'_> {
    /// Linux `hugetlb_change_protection` over one hugetlb VMA part: a
    /// PROTECTION_VMA pair over it (widened for PMD sharing), sent even
    /// when nothing is mapped, around changing every huge entry and the
    /// flush.
    pub(crate) fn hugetlb_change_protection(&self, vma: &Vma, prot: Prot) {
        let mm = self.mm;
        let (s, e) = adjust_range_if_pmd_sharing_possible(vma, vma.start, vma.end);
        let inv = mm.invalidate(Event::ProtectionVma, s, e, None);
        {
            let ptl = mm.ptl();
            let blocks = mm.pmd_blocks_lockless(vma.start, vma.end);
            for &block in &blocks {
                if let Some(mut pmd) = ptl.get_pmd(block) {
                    pmd.read = prot.read;
                    pmd.write = pmd.write && prot.write;
                    ptl.set_pte(block, pmd);
                }
            }
            if !blocks.is_empty() {
                mm.flush_tlb(s, e);
            }
        }
        inv.end();
    }

    /// Linux `move_hugetlb_page_tables` for mremap: a CLEAR pair over the
    /// old range (widened for PMD sharing) around moving each huge entry
    /// to the same offset from `new` and the flush.
    pub(crate) fn move_hugetlb_page_tables(&self, vma: &Vma, old: u64, old_end: u64, new: u64) {
        let mm = self.mm;
        let (s, e) = adjust_range_if_pmd_sharing_possible(vma, old, old_end);
        let inv = mm.invalidate(Event::Clear, s, e, None);
        {
            let ptl = mm.ptl();
            let blocks = mm.pmd_blocks_lockless(old, old_end);
            for &block in &blocks {
                if let Some(pmd) = ptl.clear_pmd(block) {
                    ptl.set_pmd(new + (block - old), pmd);
                }
            }
            if !blocks.is_empty() {
                mm.flush_tlb(s, e);
            }
        }
        inv.end();
    }
}

impl Mm {
    /// Linux `copy_hugetlb_page_range` for fork, both page-table locks
    /// held: a private (COW) VMA gets a CLEAR pair on the parent over the
    /// VMA, inside which both entries of every huge page are made read-only
    /// (a pinned page is copied for the child instead); a shared VMA's
    /// entries are copied as they are, with no notification. Returns
    /// whether a parent entry was write-protected.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] copying a pinned page.
    pub(crate) fn copy_hugetlb_page_range(&self, child: &Mm, vma: &Vma) -> Result<bool> {
        let mm = &self.inner;
        let cow = matches!(vma.backing, Backing::Hugetlb(None));
        let inv = cow.then(|| mm.invalidate(Event::Clear, vma.start, vma.end, None));
        let mut protected = false;
        let copied = (|| {
            let ptl = mm.ptl();
            let child_ptl = child.inner.ptl();
            for block in mm.pmd_blocks_lockless(vma.start, vma.end) {
                let Some(mut pmd) = ptl.get_pmd(block) else {
                    continue;
                };
                let head = pmd.present_pfn().expect("a hugetlb PMD maps a page");
                if cow && mm.phys.huge_pinned(head) {
                    let new = mm.phys.alloc_huge()?;
                    mm.phys.copy_huge(head, new.pfn);
                    mm.phys.map_new_huge(new.pfn);
                    child_ptl.set_pmd(block, Pte::present(new.pfn, pmd.read, pmd.write));
                    continue;
                }
                for p in head..head + HPAGE_PMD_NR {
                    mm.phys.map(p);
                }
                if cow && pmd.write {
                    pmd.write = false;
                    ptl.set_pte(block, pmd);
                    protected = true;
                }
                child_ptl.set_pmd(block, pmd);
            }
            Ok(())
        })();
        drop(inv);
        copied.map(|()| protected)
    }
}

/// Rounds a hugetlb length up to whole 2 MiB pages (as Linux's mmap and
/// mremap do).
pub(crate) fn huge_len(len: u64) -> u64 {
    len.div_ceil(PMD_SIZE) * PMD_SIZE
}
