//! Page migration (system and device), device-exclusive entries and KSM.

use mmu_notifier::{Event, Owner};

use crate::error::{Error, Result};
use crate::frame::FrameKind;
use crate::mm::{check_range, Mm, MmInner, Ptl};
use crate::pfn::{FrameRef, ZERO_PFN};
use crate::pte::Access;
use crate::pte::{Pte, PteKind};
use crate::trace::Op;
use crate::vma::Vma;
use crate::PAGE_SIZE;

/// A page moved to device memory by [`Mm::migrate_to_device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigratedPage {
    /// Virtual address.
    pub addr: u64,
    /// The device frame now holding the data.
    pub frame: FrameRef,
    /// Whether the device-private entry allows writes.
    pub writable: bool,
}

fn page_addrs(start: u64, end: u64) -> impl Iterator<Item = u64> {
    (start..end).step_by(PAGE_SIZE as usize)
}

impl MmInner {
    /// Device-private pages of `owner` in `[start, end)` back to new system
    /// frames (Linux `migrate_vma_setup(SELECT_DEVICE_PRIVATE)` from the
    /// driver's `migrate_to_ram`): MIGRATE pair with the device as owner
    /// around installing migration entries; the driver is told per page;
    /// then the system frames are mapped and the device frames released.
    pub(crate) fn migrate_to_ram_locked(
        &self,
        start: u64,
        end: u64,
        owner: Owner,
    ) -> Result<Vec<FrameRef>> {
        self.trace.record(Op::MigrateToRam, None, start, end);
        let inv = self.invalidate(Event::Migrate, start, end, Some(owner));
        let mut collected = Vec::new();
        {
            let ptl = self.ptl();
            for (addr, pte) in ptl.ptes_in(start, end) {
                if let PteKind::DevicePrivate { pfn, owner: o } = pte.kind {
                    if o == owner {
                        let mut m = pte;
                        m.kind = PteKind::Migration { pfn };
                        ptl.set_pte(addr, m);
                        collected.push((addr, pfn, pte));
                    }
                }
            }
            if !collected.is_empty() {
                self.flush_tlb(start, end);
            }
        }
        inv.end();
        for pm in self.phys.pagemaps(owner) {
            for &(addr, pfn, _) in &collected {
                pm.migrating_to_ram(self.subs.id(), addr, self.phys.frame_ref(pfn));
            }
        }
        let mut out = Vec::new();
        let mut oom = false;
        for (addr, dev, old) in collected {
            let new = if oom {
                None
            } else {
                self.phys.alloc_frame().ok()
            };
            oom = new.is_none();
            if let Some(n) = new {
                self.phys.copy_frame(dev, n.pfn);
            }
            let ptl = self.ptl();
            let present = |pfn| PteKind::Present { pfn };
            if self.finish_migration(&ptl, addr, dev, new, old, present) {
                out.extend(new);
            }
        }
        self.migration_done();
        if oom {
            return Err(Error::OutOfMemory);
        }
        Ok(out)
    }

    /// Linux `remove_migration_pte` for one page, under `ptl`: if `addr`
    /// still holds the migration entry of `src`, map `dst` there with the
    /// bits of `old` and the kind `kind(dst)`, and release `src`'s mapping;
    /// without a destination, put `old` back. The destination's allocation
    /// reference is dropped either way. Returns whether `dst` was mapped.
    fn finish_migration(
        &self,
        ptl: &Ptl<'_>,
        addr: u64,
        src: u64,
        dst: Option<FrameRef>,
        old: Pte,
        kind: impl FnOnce(u64) -> PteKind,
    ) -> bool {
        let still = ptl.get_pte(addr).map(|p| p.kind) == Some(PteKind::Migration { pfn: src });
        match dst {
            Some(d) if still => {
                self.phys.map(d.pfn);
                ptl.set_pte(
                    addr,
                    Pte {
                        kind: kind(d.pfn),
                        ..old
                    },
                );
                self.phys.unmap(src);
                self.phys.put_frame(d.pfn);
                true
            }
            Some(d) => {
                self.phys.put_frame(d.pfn);
                false
            }
            None => {
                if still {
                    ptl.set_pte(addr, old);
                }
                false
            }
        }
    }

    /// Write-protects one page for KSM (Linux `write_protect_page`): a CLEAR
    /// pair; inside, a writable or dirty PTE is cleared, flushed and set
    /// read-only and clean through `set_pte_at_notify`. Fails when the page
    /// has references besides its mappings (a pin, a migration).
    fn ksm_write_protect(&self, addr: u64, pfn: u64) -> bool {
        // try_to_merge_one_page: KSM merges base pages; a THP is split
        // first.
        if self.pmd_lockless(addr).is_some() {
            self.split_folio(addr);
        }
        let inv = self.invalidate(Event::Clear, addr, addr + PAGE_SIZE, None);
        let ok = {
            let ptl = self.ptl();
            match ptl.pte_offset_map(addr) {
                Some(pte) if pte.kind == PteKind::Present { pfn } => {
                    let exclusive_refs = self.phys.refcount(pfn) == self.phys.mapcount(pfn);
                    if exclusive_refs && (pte.write || pte.dirty) {
                        ptl.clear_pte(addr);
                        self.flush_tlb(addr, addr + PAGE_SIZE);
                        let mut p = pte;
                        p.write = false;
                        p.dirty = false;
                        ptl.set_pte_at_notify(addr, p);
                    }
                    exclusive_refs
                }
                _ => false,
            }
        };
        inv.end();
        ok
    }

    /// Takes a reference on `pfn` if `addr` still maps it.
    fn ksm_hold(&self, addr: u64, pfn: u64) -> bool {
        let ptl = self.ptl();
        let mapped = ptl.get_pte(addr).and_then(|p| p.present_pfn()) == Some(pfn);
        if mapped {
            self.phys.get(pfn);
        }
        mapped
    }

    /// Points one page at the KSM page (Linux `replace_page`): a CLEAR pair
    /// around clear, flush and `set_pte_at_notify`; the old frame's
    /// reference is dropped after the end.
    fn ksm_replace(&self, addr: u64, old: u64, kpage: u64) -> bool {
        let inv = self.invalidate(Event::Clear, addr, addr + PAGE_SIZE, None);
        let done = {
            let ptl = self.ptl();
            match ptl.pte_offset_map(addr) {
                Some(pte) if pte.kind == PteKind::Present { pfn: old } && !pte.write => {
                    self.phys.map(kpage);
                    ptl.clear_pte(addr);
                    self.flush_tlb(addr, addr + PAGE_SIZE);
                    let mut p = Pte::present(kpage, pte.read, false);
                    p.dirty = false;
                    p.soft_dirty = pte.soft_dirty;
                    ptl.set_pte_at_notify(addr, p);
                    true
                }
                _ => false,
            }
        };
        inv.end();
        if done {
            self.phys.unmap(old);
        }
        done
    }
}

impl Mm {
    /// Migrates device-private pages of `owner` in `[addr, addr + len)` back
    /// to system memory (dmirror's MIGRATE_TO_SYS; a CPU access does the same
    /// for one page). Returns the new system frames.
    ///
    /// # Errors
    /// [`Error::InvalidRange`], [`Error::OutOfMemory`] (pages left on the
    /// device stay valid).
    pub fn migrate_to_ram(&self, addr: u64, len: u64, owner: Owner) -> Result<Vec<FrameRef>> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_read();
        g.mm.migrate_to_ram_locked(start, end, owner)
    }

    /// Migrates the private anonymous pages of `[addr, addr + len)` (inside
    /// one readable VMA) to new device-private frames of `owner` (Linux
    /// `migrate_vma_setup` / `_pages` / `_finalize` with
    /// `MIGRATE_VMA_SELECT_SYSTEM`, as dmirror's MIGRATE_TO_DEV does):
    ///
    /// 1. collect: a MIGRATE pair (owner = `owner`) around replacing present
    ///    pages by migration entries; holes and the zero page are selected
    ///    too; pinned, KSM, shared and device pages are not;
    /// 2. copy into device frames;
    /// 3. insert: a second MIGRATE pair, started lazily at the first hole
    ///    page, over `[hole, end)`, around filling holes;
    /// 4. finalize: migration entries become device-private entries and the
    ///    old frames are released.
    ///
    /// Returns the pages migrated.
    ///
    /// # Errors
    /// [`Error::InvalidRange`]; [`Error::NotMapped`] if the range is not in
    /// one VMA; [`Error::Protection`] if that VMA is not readable.
    pub fn migrate_to_device(
        &self,
        addr: u64,
        len: u64,
        owner: Owner,
    ) -> Result<Vec<MigratedPage>> {
        self.migrate_to_device_with(addr, len, owner, &mut || true)
    }

    /// [`migrate_to_device`](Self::migrate_to_device) with the driver's say
    /// on each device page it allocates: where `may_alloc` returns false the
    /// allocation fails (the driver's `alloc_page` returned NULL), and that
    /// page stays in system memory, as in Linux.
    ///
    /// # Errors
    /// As [`migrate_to_device`](Self::migrate_to_device).
    pub fn migrate_to_device_with(
        &self,
        addr: u64,
        len: u64,
        owner: Owner,
        may_alloc: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<MigratedPage>> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_read();
        let mm = g.mm;
        mm.check_usable()?;
        let vma = mm.vma_for(start, Access::Read)?;
        if vma.is_hugetlb() {
            // migrate_vma_setup refuses hugetlb VMAs (-EINVAL).
            return Err(Error::NotMapped {
                addr: start,
                why: "device migration of hugetlb memory",
            });
        }
        if vma.end < end {
            return Err(Error::NotMapped {
                addr: vma.end,
                why: "migration range is not inside one VMA",
            });
        }
        mm.trace.record(Op::MigrateToDevice, None, start, end);
        enum Sel {
            Hole { zero: bool },
            Page { pfn: u64, pte: Pte },
        }
        // 1. collect
        let inv = mm.invalidate(Event::Migrate, start, end, Some(owner));
        let mut selected: Vec<(u64, Sel)> = Vec::new();
        if vma.is_private() {
            // migrate_vma_collect_pmd: a THP is split (split_folio, nested
            // in this pair) and its pages collected one by one.
            mm.split_folios_in(start, end);
            let ptl = mm.ptl();
            let mut flush = false;
            for a in page_addrs(start, end) {
                if ptl.get_pmd(a).is_some() {
                    // A THP faulted in since the split: left in place.
                    continue;
                }
                match ptl.get_pte(a) {
                    None => selected.push((a, Sel::Hole { zero: false })),
                    Some(p) if p.is_zero() => selected.push((a, Sel::Hole { zero: true })),
                    Some(p) => {
                        let PteKind::Present { pfn } = p.kind else {
                            continue;
                        };
                        if !mm.phys.is_system(pfn)
                            || mm.phys.pincount(pfn) > 0
                            || mm.phys.is_ksm(pfn)
                        {
                            continue;
                        }
                        mm.phys.get(pfn);
                        let mut m = p;
                        m.kind = PteKind::Migration { pfn };
                        ptl.set_pte(a, m);
                        flush = true;
                        selected.push((a, Sel::Page { pfn, pte: p }));
                    }
                }
            }
            if flush {
                mm.flush_tlb(start, end);
            }
        }
        inv.end();
        // 2. allocate and copy
        let mut dsts = Vec::with_capacity(selected.len());
        for (_, sel) in &selected {
            let d = if may_alloc() {
                mm.phys.alloc(FrameKind::DevicePrivate(owner)).ok()
            } else {
                None
            };
            if let (Some(d), Sel::Page { pfn, .. }) = (d, sel) {
                mm.phys.copy_frame(*pfn, d.pfn);
            }
            dsts.push(d);
        }
        // 3. insert into holes, 4. finalize
        let mut out = Vec::new();
        let mut insert: Option<crate::mm::Inv<'_>> = None;
        for ((a, sel), dst) in selected.into_iter().zip(dsts) {
            match sel {
                Sel::Hole { zero } => {
                    let Some(d) = dst else { continue };
                    if insert.is_none() {
                        mm.mark_anon(&vma);
                        insert = Some(mm.invalidate(Event::Migrate, a, end, Some(owner)));
                    }
                    let ptl = mm.ptl();
                    let cur = ptl.get_pte(a);
                    let entry = Pte {
                        kind: PteKind::DevicePrivate { pfn: d.pfn, owner },
                        read: vma.prot.read,
                        write: vma.prot.write,
                        young: true,
                        dirty: false,
                        soft_dirty: true,
                    };
                    if zero && cur.is_some_and(|p| p.is_zero()) {
                        ptl.clear_pte(a);
                        mm.flush_tlb(a, a + PAGE_SIZE);
                        ptl.set_pte_at_notify(a, entry);
                    } else if cur.is_none() && !zero {
                        ptl.set_pte(a, entry);
                    } else {
                        mm.phys.put_frame(d.pfn);
                        continue;
                    }
                    mm.phys.map(d.pfn);
                    mm.phys.put_frame(d.pfn);
                    out.push(MigratedPage {
                        addr: a,
                        frame: d,
                        writable: entry.write,
                    });
                }
                Sel::Page { pfn, pte } => {
                    let ptl = mm.ptl();
                    let device = |d| PteKind::DevicePrivate { pfn: d, owner };
                    if mm.finish_migration(&ptl, a, pfn, dst, pte, device) {
                        let frame = dst.expect("mapped");
                        out.push(MigratedPage {
                            addr: a,
                            frame,
                            writable: pte.write,
                        });
                    }
                    mm.phys.put_frame(pfn);
                }
            }
        }
        drop(insert);
        mm.migration_done();
        Ok(out)
    }

    /// System page migration (NUMA balancing, compaction; Linux
    /// `try_to_migrate_one` then `remove_migration_ptes`): per present
    /// private page, a CLEAR pair of that page around replacing it by a
    /// migration entry; then the data moves to a new frame and the old one is
    /// freed. Pinned and KSM pages are skipped. Returns the pages moved.
    ///
    /// # Errors
    /// [`Error::InvalidRange`].
    pub fn migrate_pages(&self, addr: u64, len: u64) -> Result<usize> {
        let (g, start, end) = self.read_op(Op::Migrate, addr, len)?;
        let mm = g.mm;
        let private = mm.vmas_read().ranges(start, end, Vma::is_private);
        let mut moved = 0;
        for (vs, ve) in private {
            // A THP is split and its pages migrated one by one (what Linux
            // does when it cannot allocate a THP at the destination; the
            // model always does).
            mm.split_folios_in(vs, ve);
            for (a, pte) in mm.ptes_lockless(vs, ve) {
                let Some(pfn) = pte.present_pfn().filter(|&p| p != ZERO_PFN) else {
                    continue;
                };
                if !mm.phys.is_system(pfn) || mm.phys.pincount(pfn) > 0 || mm.phys.is_ksm(pfn) {
                    continue;
                }
                let inv = mm.invalidate(Event::Clear, a, a + PAGE_SIZE, None);
                let entry = {
                    let ptl = mm.ptl();
                    let cur = ptl
                        .pte_offset_map(a)
                        .filter(|p| p.kind == PteKind::Present { pfn });
                    if let Some(cur) = cur {
                        mm.phys.get(pfn);
                        ptl.clear_pte(a);
                        mm.flush_tlb(a, a + PAGE_SIZE);
                        let mut m = cur;
                        m.kind = PteKind::Migration { pfn };
                        ptl.set_pte(a, m);
                    }
                    cur
                };
                inv.end();
                let Some(old) = entry else { continue };
                let new = mm.phys.alloc_frame().ok();
                if let Some(n) = new {
                    mm.phys.copy_frame(pfn, n.pfn);
                }
                {
                    let ptl = mm.ptl();
                    let present = |p| PteKind::Present { pfn: p };
                    moved += usize::from(mm.finish_migration(&ptl, a, pfn, new, old, present));
                    mm.phys.put_frame(pfn);
                }
                mm.migration_done();
            }
        }
        Ok(moved)
    }

    /// Makes `[addr, addr + len)` device-exclusive for a device (Linux
    /// `make_device_exclusive_range`): each page is faulted in for writing,
    /// then an EXCLUSIVE pair (owner = `owner`) of that page around replacing
    /// its PTE by a device-exclusive entry. Returns per page the frame, or
    /// `None` where the page could not be made exclusive.
    ///
    /// # Errors
    /// [`Error::InvalidRange`].
    pub fn make_device_exclusive(
        &self,
        addr: u64,
        len: u64,
        owner: Option<Owner>,
    ) -> Result<Vec<Option<FrameRef>>> {
        let (g, start, end) = self.read_op(Op::MakeExclusive, addr, len)?;
        let mm = g.mm;
        let mut out = Vec::new();
        for a in page_addrs(start, end) {
            let Ok(pte) = mm.fault_in(a, Access::Write) else {
                out.push(None);
                continue;
            };
            let pfn = pte.present_pfn().expect("faulted in");
            if mm.vmas_read().find(a).is_some_and(|v| v.is_hugetlb()) {
                // Only base pages and THPs (split below) become exclusive.
                out.push(None);
                continue;
            }
            // get_user_pages with FOLL_SPLIT_PMD.
            if mm.pmd_lockless(a).is_some() {
                mm.split_huge_pmd(a);
            }
            let inv = mm.invalidate(Event::Exclusive, a, a + PAGE_SIZE, owner);
            let done = {
                let ptl = mm.ptl();
                match ptl.pte_offset_map(a) {
                    Some(cur) if cur.kind == PteKind::Present { pfn } && cur.write => {
                        ptl.clear_pte(a);
                        mm.flush_tlb(a, a + PAGE_SIZE);
                        let mut e = cur;
                        e.kind = PteKind::DeviceExclusive { pfn, owner };
                        ptl.set_pte(a, e);
                        Some(mm.phys.frame_ref(pfn))
                    }
                    _ => None,
                }
            };
            inv.end();
            out.push(done);
        }
        Ok(out)
    }

    /// KSM: merges identical private anonymous pages of `[addr, addr + len)`
    /// (Linux `try_to_merge_two_pages` / `try_to_merge_with_ksm_page`). The
    /// first page of a group becomes the KSM page (write-protected in
    /// place); each other page is write-protected, compared and replaced.
    /// Returns the number of pages replaced.
    ///
    /// # Errors
    /// [`Error::InvalidRange`].
    pub fn ksm_merge(&self, addr: u64, len: u64) -> Result<usize> {
        let (g, start, end) = self.read_op(Op::KsmMerge, addr, len)?;
        let mm = g.mm;
        let mut candidates = Vec::new();
        let vmas = mm.vmas_read().overlapping(start, end);
        for v in vmas {
            if !v.is_private() {
                continue;
            }
            for (a, pte) in mm.ptes_lockless(v.start, v.end) {
                if let Some(pfn) = pte.present_pfn().filter(|&p| p != ZERO_PFN) {
                    if mm.phys.is_system(pfn) {
                        candidates.push((a, pfn));
                    }
                }
            }
        }
        // Stable (KSM) pages are held by a reference for the whole pass: a
        // concurrent unmap may drop their last mapping meanwhile (Linux
        // holds the KSM page's reference while merging into it).
        let mut stable: Vec<u64> = Vec::new();
        let mut unstable: Vec<(u64, u64)> = Vec::new();
        let mut merged = 0;
        for (a, pfn) in candidates {
            if mm.phys.is_ksm(pfn) {
                if !stable.contains(&pfn) && mm.ksm_hold(a, pfn) {
                    stable.push(pfn);
                }
                continue;
            }
            let target = match stable.iter().find(|&&k| mm.phys.same_content(k, pfn)) {
                Some(&k) => Some(k),
                None => {
                    let partner = unstable
                        .iter()
                        .position(|&(_, p)| p != pfn && mm.phys.same_content(p, pfn));
                    match partner {
                        Some(i) => {
                            let (pa, pp) = unstable.remove(i);
                            if mm.ksm_write_protect(pa, pp) && mm.ksm_hold(pa, pp) {
                                mm.phys.set_ksm(pp);
                                stable.push(pp);
                                Some(pp)
                            } else {
                                None
                            }
                        }
                        None => {
                            unstable.push((a, pfn));
                            None
                        }
                    }
                }
            };
            let Some(k) = target else { continue };
            if mm.ksm_write_protect(a, pfn)
                && mm.phys.same_content(k, pfn)
                && mm.ksm_replace(a, pfn, k)
            {
                merged += 1;
            }
        }
        for k in stable {
            mm.phys.put_frame(k);
        }
        Ok(merged)
    }
}
