//! Mapping changes: mmap, munmap, mremap, madvise and the OOM reaper.

use mmu_notifier::sync::Ordering;

use mmu_notifier::Event;

use crate::error::{Error, Result};
use crate::mm::{check_range, Gather, Mm, MmInner, MmapWrite, MMAP_BASE, TASK_SIZE};
use crate::ops::hugetlb::{adjust_range_if_pmd_sharing_possible, huge_len};
use crate::pte::PteKind;
use crate::trace::Op;
use crate::vma::{Backing, MapKind, Prot, SharedObject, Vma};
use crate::{PAGE_SIZE, PMD_SIZE};

/// What [`Mm::oom_reap`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OomReport {
    /// VMAs whose memory was reaped.
    pub reaped: Vec<(u64, u64)>,
    /// VMAs skipped because a notifier returned `Again`: retry later.
    pub retry: Vec<(u64, u64)>,
}

impl OomReport {
    /// Whether the reaper must try again later (Linux: `__oom_reap_task_mm`
    /// returned false).
    pub fn needs_retry(&self) -> bool {
        !self.retry.is_empty()
    }
}

impl MmapWrite<'_> {
    /// Unmaps `[start, end)`: one UNMAP pair around the zap of every VMA in
    /// it (Linux `do_vmi_munmap` → `unmap_region` → `unmap_vmas`). No VMA in
    /// the range: no notification. A method of the mmap write lock, which
    /// it needs.
    pub(crate) fn do_munmap(&self, start: u64, end: u64) {
        let mm = self.mm;
        // __split_vma → vma_adjust_trans_huge, before the unmap's pair.
        mm.split_huge_pmds_at(start, end);
        let removed = mm.vmas_write().remove_range(start, end);
        if removed.is_empty() {
            return;
        }
        let mut gather = Gather::new(mm);
        let inv = mm.invalidate(Event::Unmap, start, end, None);
        mm.zap_vmas(&mut gather, &removed);
        inv.end();
        gather.finish();
    }

    /// Linux `move_vma`: new VMA, `move_page_tables` under an UNMAP pair of
    /// the old range, then munmap of the old range.
    fn move_vma(&self, vma: &Vma, ostart: u64, oend: u64, nstart: u64, new_len: u64) {
        let mm = self.mm;
        let mut moved = vma.slice(ostart, oend);
        moved.start = nstart;
        moved.end = nstart + new_len;
        mm.vmas_write().insert(moved);
        if vma.is_hugetlb() {
            self.move_hugetlb_page_tables(vma, ostart, oend.min(ostart + new_len), nstart);
            self.do_munmap(ostart, oend);
            return;
        }
        {
            let inv = mm.invalidate(Event::Unmap, ostart, oend, None);
            let moved_end = oend.min(ostart + new_len);
            // move_page_tables: a PMD moves whole when the block is inside
            // the range and lands aligned; otherwise it is split first.
            let mut pmds = Vec::new();
            for block in mm.split_partial_huge_pmds(ostart, moved_end) {
                if (nstart + (block - ostart)) % PMD_SIZE == 0 {
                    pmds.push(block);
                } else {
                    mm.split_huge_pmd(block);
                }
            }
            {
                let ptl = mm.ptl();
                for &block in &pmds {
                    if let Some(head) = ptl.clear_pmd(block) {
                        ptl.set_pmd(nstart + (block - ostart), head);
                    }
                }
                let ptes = ptl.ptes_in(ostart, moved_end);
                for (addr, _) in &ptes {
                    let pte = ptl.clear_pte(*addr).expect("listed under the PTL");
                    ptl.set_pte(nstart + (addr - ostart), pte);
                }
                if !ptes.is_empty() || !pmds.is_empty() {
                    mm.flush_tlb(ostart, oend);
                }
            }
            inv.end();
        }
        self.do_munmap(ostart, oend);
    }
}

impl MmInner {
    /// Zaps every PTE and PMD entry of `vmas` (PTL taken here). A PMD
    /// mapping a VMA part covers whole is zapped whole; one it covers in
    /// part is split first, wherever the walk meets it, with its own CLEAR
    /// pair nested in the caller's (Linux `zap_pmd_range`: under the mmap
    /// read lock a THP may be faulted in next to a madvise at any time).
    pub(crate) fn zap_vmas(&self, gather: &mut Gather<'_>, vmas: &[Vma]) {
        for v in vmas {
            if v.is_hugetlb() {
                // The whole VMA decides the widening (after munmap took it
                // out of the tree, the part is the VMA).
                let full = self.vmas_read().find(v.start).cloned();
                self.unmap_hugepage_range(gather, full.as_ref().unwrap_or(v), v.start, v.end);
                continue;
            }
            loop {
                let partial = |blocks: Vec<u64>| {
                    blocks
                        .into_iter()
                        .find(|&b| b < v.start || b + PMD_SIZE > v.end)
                };
                if let Some(b) = partial(self.pmd_blocks_lockless(v.start, v.end)) {
                    self.split_huge_pmd(b);
                    continue;
                }
                let ptl = self.ptl();
                if partial(self.pmd_blocks_lockless(v.start, v.end)).is_some() {
                    continue;
                }
                for (addr, _) in ptl.ptes_in(v.start, v.end) {
                    gather.zap(&ptl, addr);
                }
                break;
            }
        }
    }
}

impl Mm {
    /// Maps `len` bytes at an address the address space picks.
    ///
    /// # Errors
    /// [`Error::InvalidRange`] for a zero or unaligned length,
    /// [`Error::NoAddressSpace`] when nothing is free.
    pub fn mmap(&self, len: u64, prot: Prot, kind: MapKind) -> Result<u64> {
        check_range(MMAP_BASE, len)?;
        let (len, align) = match kind {
            MapKind::Hugetlb { .. } => (huge_len(len), PMD_SIZE),
            _ => (len, PAGE_SIZE),
        };
        let g = self.mmap_write();
        let addr =
            g.mm.vmas_read()
                .find_free_aligned(MMAP_BASE, len, align)
                .filter(|a| a + len <= TASK_SIZE)
                .ok_or(Error::NoAddressSpace { len })?;
        self.insert_vma(&g, addr, len, prot, kind)
    }

    /// Maps `len` bytes at exactly `addr` (`MAP_FIXED`): whatever was mapped
    /// there is unmapped first, with its UNMAP notification.
    ///
    /// # Errors
    /// [`Error::InvalidRange`] for bad ranges.
    pub fn mmap_fixed(&self, addr: u64, len: u64, prot: Prot, kind: MapKind) -> Result<u64> {
        let (start, end) = check_range(addr, len)?;
        let (start, end) = match kind {
            MapKind::Hugetlb { .. } if addr % PMD_SIZE != 0 => {
                return Err(Error::InvalidRange { addr, len });
            }
            MapKind::Hugetlb { .. } => check_range(start, huge_len(end - start))?,
            _ => (start, end),
        };
        let len = end - start;
        let g = self.mmap_write();
        g.mm.check_hugetlb_split(&[start, end])?;
        g.do_munmap(start, end);
        self.insert_vma(&g, addr, len, prot, kind)
    }

    fn insert_vma(
        &self,
        g: &MmapWrite<'_>,
        addr: u64,
        len: u64,
        prot: Prot,
        kind: MapKind,
    ) -> Result<u64> {
        let (backing, pgoff) = match kind {
            MapKind::AnonPrivate => (Backing::AnonPrivate, 0),
            MapKind::AnonShared => (Backing::AnonShared(SharedObject::anon(&g.mm.phys)), 0),
            MapKind::File { file, pgoff } => (Backing::File(file), pgoff),
            MapKind::Hugetlb { shared: false } => (Backing::Hugetlb(None), 0),
            MapKind::Hugetlb { shared: true } => {
                (Backing::Hugetlb(Some(SharedObject::anon(&g.mm.phys))), 0)
            }
        };
        g.mm.vmas_write().insert(Vma {
            start: addr,
            end: addr + len,
            prot,
            backing,
            pgoff,
            anon_vma: false,
            hugepage: false,
        });
        g.mm.trace.record(Op::Mmap, None, addr, addr + len);
        Ok(addr)
    }

    /// Unmaps `[addr, addr + len)`: one UNMAP invalidation over the whole
    /// range around the zap of every VMA in it; frames are freed after the
    /// TLB flush (full gather batches possibly before the end callback).
    ///
    /// # Errors
    /// [`Error::InvalidRange`] for bad ranges. Unmapping nothing is not an
    /// error (as in Linux).
    pub fn munmap(&self, addr: u64, len: u64) -> Result<()> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_write();
        g.mm.check_hugetlb_split(&[start, end])?;
        g.mm.trace.record(Op::Munmap, None, start, end);
        g.do_munmap(start, end);
        Ok(())
    }

    /// Resizes and possibly moves `[old, old + old_len)` (Linux `mremap`).
    /// Shrinking unmaps the tail; growing extends in place when the space
    /// after it is free, otherwise moves it if `may_move`. A move is an UNMAP
    /// pair over the old range around the page-table move, followed by the
    /// (now empty) munmap of the old range with its own UNMAP pair.
    ///
    /// # Errors
    /// [`Error::InvalidRange`] for bad ranges, [`Error::NotMapped`] if the
    /// old range is not inside one VMA, [`Error::NoAddressSpace`] if growing
    /// needs a move that is not allowed or not possible.
    pub fn mremap(&self, old: u64, old_len: u64, new_len: u64, may_move: bool) -> Result<u64> {
        self.mremap_inner(
            old,
            old_len,
            new_len,
            if may_move { Some(None) } else { None },
        )
    }

    /// Moves `[old, old + old_len)` to exactly `new` with size `new_len`
    /// (`MREMAP_MAYMOVE | MREMAP_FIXED`); whatever was at `new` is unmapped.
    ///
    /// # Errors
    /// As [`mremap`](Self::mremap), plus [`Error::InvalidRange`] when the
    /// ranges overlap.
    pub fn mremap_fixed(&self, old: u64, old_len: u64, new_len: u64, new: u64) -> Result<u64> {
        self.mremap_inner(old, old_len, new_len, Some(Some(new)))
    }

    fn mremap_inner(
        &self,
        old: u64,
        old_len: u64,
        new_len: u64,
        target: Option<Option<u64>>,
    ) -> Result<u64> {
        let (ostart, oend) = check_range(old, old_len)?;
        check_range(old, new_len)?;
        let g = self.mmap_write();
        let mm = g.mm;
        let vma = mm
            .vmas_read()
            .find(ostart)
            .cloned()
            .filter(|v| v.end >= oend)
            .ok_or(Error::NotMapped {
                addr: ostart,
                why: "mremap range is not inside one VMA",
            })?;
        let (oend, new_len) = if vma.is_hugetlb() {
            // Linux's mremap of hugetlb: lengths rounded to huge pages,
            // addresses aligned, no growth.
            let (old_len, new_len) = (huge_len(oend - ostart), huge_len(new_len));
            let new_ok = !matches!(target, Some(Some(n)) if n % PMD_SIZE != 0);
            if ostart % PMD_SIZE != 0 || !new_ok || new_len > old_len || ostart + old_len > vma.end
            {
                return Err(Error::InvalidRange {
                    addr: old,
                    len: old_len,
                });
            }
            (ostart + old_len, new_len)
        } else {
            (oend, new_len)
        };
        mm.trace.record(Op::Mremap, None, ostart, oend);
        if let Some(Some(new)) = target {
            let (nstart, nend) = check_range(new, new_len)?;
            if nstart < oend && ostart < nend {
                return Err(Error::InvalidRange {
                    addr: new,
                    len: new_len,
                });
            }
            mm.check_hugetlb_split(&[nstart, nend])?;
            g.do_munmap(nstart, nend);
            g.move_vma(&vma, ostart, oend, nstart, new_len);
            return Ok(nstart);
        }
        if new_len <= old_len {
            if new_len < old_len {
                g.do_munmap(ostart + new_len, oend);
            }
            return Ok(ostart);
        }
        let grow_end = ostart + new_len;
        if vma.end == oend && grow_end <= TASK_SIZE && mm.vmas_read().is_free(oend, grow_end) {
            // Grow in place: only the VMA changes, no PTE does.
            mm.vmas_write()
                .update_range(vma.start, vma.end, |v| v.end = grow_end);
            return Ok(ostart);
        }
        if target.is_none() {
            return Err(Error::NoAddressSpace { len: new_len });
        }
        let align = if vma.is_hugetlb() {
            PMD_SIZE
        } else {
            PAGE_SIZE
        };
        let nstart = mm
            .vmas_read()
            .find_free_aligned(MMAP_BASE, new_len, align)
            .filter(|a| a + new_len <= TASK_SIZE)
            .ok_or(Error::NoAddressSpace { len: new_len })?;
        g.move_vma(&vma, ostart, oend, nstart, new_len);
        Ok(nstart)
    }

    /// `madvise(MADV_DONTNEED)`: per VMA, a CLEAR pair around the zap of the
    /// range (Linux `zap_page_range_single`). Private pages are freed; shared
    /// pages stay in their object.
    ///
    /// # Errors
    /// [`Error::InvalidRange`], or [`Error::NotMapped`] if part of the range
    /// has no VMA (checked before anything is changed).
    pub fn madvise_dontneed(&self, addr: u64, len: u64) -> Result<()> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_read();
        let mm = g.mm;
        let mut vmas = mm.vmas_read().covering(start, end)?;
        // madvise_dontneed_free_valid_vma: in hugetlb memory the start must
        // be huge-page aligned and the end is rounded down.
        for v in &mut vmas {
            if v.is_hugetlb() {
                if v.start % PMD_SIZE != 0 {
                    return Err(Error::InvalidRange { addr, len });
                }
                v.end &= !(PMD_SIZE - 1);
            }
        }
        vmas.retain(|v| v.start < v.end);
        mm.trace.record(Op::MadviseDontneed, None, start, end);
        for v in vmas {
            let mut gather = Gather::new(mm);
            // zap_page_range_single, widened for PMD sharing in hugetlb.
            let full = mm.vmas_read().find(v.start).cloned().unwrap_or(v.clone());
            let (s, e) = adjust_range_if_pmd_sharing_possible(&full, v.start, v.end);
            let inv = mm.invalidate(Event::Clear, s, e, None);
            mm.zap_vmas(&mut gather, std::slice::from_ref(&v));
            inv.end();
            gather.finish();
        }
        Ok(())
    }

    /// `madvise(MADV_FREE)`: per VMA, a CLEAR pair (clipped to the VMA)
    /// around marking exclusive pages clean, old and lazily freeable; swap
    /// entries are dropped. Reclaim later discards such pages unless written.
    ///
    /// # Errors
    /// [`Error::InvalidRange`]; [`Error::NotMapped`] for holes or for
    /// non-private-anonymous VMAs (Linux `-EINVAL`).
    pub fn madvise_free(&self, addr: u64, len: u64) -> Result<()> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_read();
        let mm = g.mm;
        let vmas = mm.vmas_read().covering(start, end)?;
        if let Some(v) = vmas.iter().find(|v| !v.is_private()) {
            return Err(Error::NotMapped {
                addr: v.start,
                why: "MADV_FREE needs private anonymous memory",
            });
        }
        mm.trace.record(Op::MadviseFree, None, start, end);
        for v in vmas {
            let inv = mm.invalidate(Event::Clear, v.start, v.end, None);
            // madvise_free_huge_pmd: a THP the range covers in part is
            // split (split_folio), so only the advised pages are freed.
            for block in mm.pmd_blocks_lockless(v.start, v.end) {
                if block < v.start || block + PMD_SIZE > v.end {
                    mm.split_folio(block);
                }
            }
            {
                let ptl = mm.ptl();
                let mut flushed = false;
                for (a, mut pte) in ptl.ptes_in(v.start, v.end) {
                    if ptl.get_pmd(a).is_some_and(|_| {
                        let b = a & !(PMD_SIZE - 1);
                        b < v.start || b + PMD_SIZE > v.end
                    }) {
                        // A THP faulted in since the split: not advised whole.
                        continue;
                    }
                    match pte.kind {
                        PteKind::Swap { slot } => {
                            ptl.clear_pte(a);
                            mm.phys.swap_free(slot);
                        }
                        PteKind::Present { pfn }
                            if !pte.is_zero()
                                && mm.phys.mapcount(pfn) == 1
                                && mm.phys.pincount(pfn) == 0 =>
                        {
                            pte.dirty = false;
                            pte.young = false;
                            ptl.set_pte(a, pte);
                            mm.phys.set_lazyfree(pfn);
                            flushed = true;
                        }
                        _ => {}
                    }
                }
                if flushed {
                    mm.flush_tlb(v.start, v.end);
                }
            }
            inv.end();
        }
        Ok(())
    }

    /// The OOM reaper (Linux `__oom_reap_task_mm`): marks the address space
    /// unstable (later faults fail with [`Error::OomReaped`]), then for each
    /// private VMA a **non-blockable** UNMAP start; if a notifier answers
    /// `Again` that VMA is skipped (no end) and reported for retry.
    pub fn oom_reap(&self) -> OomReport {
        let g = self.mmap_read();
        let mm = g.mm;
        mm.oom_reaped.store(true, Ordering::Release);
        mm.trace.record(Op::OomReap, None, 0, TASK_SIZE);
        let vmas: Vec<Vma> = mm
            .vmas_read()
            .all()
            .filter(|v| v.is_private())
            .cloned()
            .collect();
        let mut report = OomReport::default();
        for v in vmas {
            let mut gather = Gather::new(mm);
            match mm.invalidate_nonblock(Event::Unmap, v.start, v.end) {
                Ok(inv) => {
                    mm.zap_vmas(&mut gather, std::slice::from_ref(&v));
                    inv.end();
                    gather.finish();
                    report.reaped.push((v.start, v.end));
                }
                Err(mmu_notifier::Again) => report.retry.push((v.start, v.end)),
            }
        }
        report
    }
}

/// Page-aligned length helper for callers: `n` pages in bytes.
pub const fn pages(n: u64) -> u64 {
    n * PAGE_SIZE
}
