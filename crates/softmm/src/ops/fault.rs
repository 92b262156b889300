//! CPU page faults (Linux `handle_mm_fault`) and CPU loads and stores.
//!
//! A fault resolves one page and returns; callers retry the access. COW
//! breaks (`wp_page_copy`) are the only fault path that notifies: a CLEAR
//! pair of one page around clear-flush, `change_pte`, set. Device-private
//! entries migrate back to RAM (MIGRATE with the device as owner) and
//! device-exclusive entries are revoked (EXCLUSIVE, owner none).

use mmu_notifier::Event;

use crate::error::{Error, Result};
use crate::mm::{Mm, MmInner, MmapRead, Ptl};
use crate::pfn::ZERO_PFN;
use crate::pte::{satisfies, Access, Pte, PteKind};
use crate::trace::Op;
use crate::vma::Vma;
use crate::PAGE_SIZE;

impl MmapRead<'_> {
    /// [`Mm::fault`] under this mmap read lock.
    ///
    /// # Errors
    /// As [`Mm::fault`].
    pub fn fault(&self, addr: u64, write: bool) -> Result<()> {
        let access = if write { Access::Write } else { Access::Read };
        self.mm
            .fault_in(addr & !(PAGE_SIZE - 1), access)
            .map(|_| ())
    }
}

impl MmInner {
    /// The VMA at `addr` if it allows `access`.
    pub(crate) fn vma_for(&self, addr: u64, access: Access) -> Result<Vma> {
        let vma = self
            .vmas_read()
            .find(addr)
            .cloned()
            .ok_or(Error::NotMapped {
                addr,
                why: "no VMA",
            })?;
        let ok = match access {
            Access::Read => vma.prot.read,
            Access::Write => vma.prot.write,
        };
        if !ok {
            return Err(Error::Protection {
                addr,
                access: access.name(),
            });
        }
        if let Some(o) = vma.object() {
            if vma.pgoff_of(addr) >= o.len_pages() {
                return Err(Error::NotMapped {
                    addr,
                    why: "beyond the end of the file (SIGBUS)",
                });
            }
        }
        Ok(vma)
    }

    /// Resolves one fault at `addr` (page aligned or not) with the mmap lock
    /// held for reading. Returns when the PTE changed or already allowed the
    /// access; the caller re-checks.
    pub(crate) fn handle_fault(&self, addr: u64, access: Access) -> Result<()> {
        self.check_usable()?;
        let addr = addr & !(PAGE_SIZE - 1);
        let vma = self.vma_for(addr, access)?;
        self.trace.record(Op::Fault, None, addr, addr + PAGE_SIZE);
        if vma.is_hugetlb() {
            return self.hugetlb_fault(&vma, addr, access);
        }
        if (access.is_write() || vma.thp_block(addr).is_some()) && vma.is_private() {
            // Before the PTL: the VMA lock is never taken under it. (A THP
            // fault allocates anonymous memory on a read too.)
            self.mark_anon(&vma);
        }
        let ptl = self.ptl();
        let Some(pte) = ptl.get_pte(addr) else {
            return self.fault_none(&ptl, &vma, addr, access);
        };
        match pte.kind {
            _ if satisfies(&pte, access) => {
                let mut p = pte;
                p.young = true;
                if access.is_write() {
                    p.dirty = true;
                    p.soft_dirty = true;
                }
                ptl.set_pte(addr, p);
                Ok(())
            }
            PteKind::Present { .. } if !access.is_write() => {
                // An inaccessible PTE of a now readable VMA.
                let mut p = pte;
                p.read = vma.prot.read;
                ptl.set_pte(addr, p);
                Ok(())
            }
            PteKind::Present { .. } if ptl.get_pmd(addr).is_some() => {
                // A write to a read-only PMD mapping of a writable VMA.
                self.do_huge_pmd_wp_page(ptl, addr, pte);
                Ok(())
            }
            PteKind::Present { pfn } => {
                // A write to a read-only PTE of a writable VMA.
                if vma.object().is_some() {
                    // wp_page_shared: same page, now writable. No notifier.
                    ptl.set_pte(addr, Pte::present(pfn, true, true));
                    return Ok(());
                }
                let exclusive = pfn != ZERO_PFN
                    && !self.phys.is_ksm(pfn)
                    && self.phys.refcount(pfn) == 1
                    && self.phys.mapcount(pfn) == 1;
                if exclusive {
                    // wp_page_reuse: the only user; no notifier.
                    ptl.set_pte(addr, Pte::present(pfn, true, true));
                    return Ok(());
                }
                drop(ptl);
                self.wp_page_copy(&vma, addr, pte)
            }
            PteKind::Swap { slot } => {
                let f = self.phys.alloc_frame()?;
                let data = self.phys.swap_take(slot);
                self.phys.set_content(f.pfn, data);
                self.phys.map(f.pfn);
                self.phys.put_frame(f.pfn); // the mapping's reference stays
                let write = access.is_write() && vma.prot.write;
                ptl.set_pte(addr, Pte::present(f.pfn, vma.prot.read, write));
                Ok(())
            }
            PteKind::Migration { .. } => {
                ptl.wait_migration();
                Ok(())
            }
            PteKind::DevicePrivate { owner, .. } => {
                drop(ptl);
                self.migrate_to_ram_locked(addr, addr + PAGE_SIZE, owner)
                    .map(|_| ())
            }
            PteKind::DeviceExclusive { .. } => {
                drop(ptl);
                self.revoke_exclusive(addr, pte);
                Ok(())
            }
        }
    }

    /// Fault on `pte_none`, under `ptl`: zero page for a private read, a
    /// new zeroed frame for a private write, the object's page for a shared
    /// mapping.
    fn fault_none(&self, ptl: &Ptl<'_>, vma: &Vma, addr: u64, access: Access) -> Result<()> {
        let read = vma.prot.read;
        if self.do_huge_pmd_anonymous_page(ptl, vma, addr) {
            return Ok(());
        }
        match vma.object() {
            None if !access.is_write() => {
                let mut pte = Pte::present(ZERO_PFN, read, false);
                pte.dirty = false;
                ptl.set_pte(addr, pte);
            }
            None => {
                let f = self.phys.alloc_frame()?;
                self.phys.map(f.pfn);
                self.phys.put_frame(f.pfn);
                ptl.set_pte(addr, Pte::present(f.pfn, read, true));
            }
            Some(obj) => {
                let pfn = obj.page(vma.pgoff_of(addr))?;
                self.phys.map(pfn);
                let mut pte = Pte::present(pfn, read, access.is_write());
                pte.dirty = access.is_write();
                ptl.set_pte(addr, pte);
            }
        }
        Ok(())
    }

    /// The VMA now has anonymous pages (Linux `anon_vma_prepare`). Takes
    /// the VMA lock for writing: never call it with the PTL held.
    pub(crate) fn mark_anon(&self, vma: &Vma) {
        if !vma.anon_vma {
            self.vmas_write()
                .update_range(vma.start, vma.end, |v| v.anon_vma = true);
        }
    }

    /// Linux `wp_page_copy`: copy to a new frame, then a CLEAR pair of one
    /// page around clear + flush + `set_pte_at_notify` (under the PTL), and the
    /// old frame's last reference dropped after the end.
    fn wp_page_copy(&self, vma: &Vma, addr: u64, old: Pte) -> Result<()> {
        let old_pfn = old.present_pfn().expect("COW of a present PTE");
        let new = self.phys.alloc_frame()?;
        self.mark_anon(vma);
        if old_pfn != ZERO_PFN {
            self.phys.copy_frame(old_pfn, new.pfn);
        }
        self.trace
            .record(Op::CowFault, None, addr, addr + PAGE_SIZE);
        let inv = self.invalidate(Event::Clear, addr, addr + PAGE_SIZE, None);
        let mut release_old = false;
        {
            let ptl = self.ptl();
            if ptl.pte_offset_map(addr).and_then(|p| p.present_pfn()) == Some(old_pfn) {
                ptl.clear_pte(addr);
                self.flush_tlb(addr, addr + PAGE_SIZE);
                self.phys.map(new.pfn);
                ptl.set_pte_at_notify(addr, Pte::present(new.pfn, vma.prot.read, true));
                release_old = old_pfn != ZERO_PFN;
            }
        }
        inv.end();
        // The allocation's reference: the mapping holds its own now (or the
        // PTE changed under us and the new frame is simply freed).
        self.phys.put_frame(new.pfn);
        if release_old {
            self.phys.unmap(old_pfn);
        }
        Ok(())
    }

    /// Linux `remove_device_exclusive_entry`: an EXCLUSIVE pair (owner none)
    /// of one page around restoring the normal PTE.
    pub(crate) fn revoke_exclusive(&self, addr: u64, old: Pte) {
        self.trace
            .record(Op::RevokeExclusive, None, addr, addr + PAGE_SIZE);
        let inv = self.invalidate(Event::Exclusive, addr, addr + PAGE_SIZE, None);
        {
            let ptl = self.ptl();
            if let Some(cur) = ptl.get_pte(addr).filter(|p| *p == old) {
                let pfn = cur.pfn().expect("exclusive entries have a frame");
                let mut pte = Pte::present(pfn, cur.read, cur.write);
                pte.dirty = cur.dirty;
                ptl.set_pte(addr, pte);
            }
        }
        inv.end();
    }

    /// Faults until the page at `addr` allows `access` by the CPU; returns
    /// the PTE as it was then (read without the PTL).
    pub(crate) fn fault_in(&self, addr: u64, access: Access) -> Result<Pte> {
        loop {
            if let Some(p) = self.pte_lockless(addr).filter(|p| satisfies(p, access)) {
                if self.vma_for(addr, access).is_ok() {
                    return Ok(p);
                }
            }
            self.handle_fault(addr, access)?;
        }
    }

    /// CPU load or store of `len` bytes at `addr` through the page table
    /// (sets the accessed and dirty bits as the hardware does).
    fn cpu_access(
        &self,
        addr: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(u64, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let a = addr + done as u64;
            let page = a & !(PAGE_SIZE - 1);
            let off = (a - page) as usize;
            let n = (PAGE_SIZE as usize - off).min(len - done);
            loop {
                self.fault_in(page, access)?;
                let ptl = self.ptl();
                let Some(mut pte) = ptl.get_pte(page).filter(|p| satisfies(p, access)) else {
                    continue;
                };
                let pfn = pte.present_pfn().expect("satisfies() means present");
                f(pfn, off, done, n)?;
                pte.young = true;
                if access.is_write() {
                    pte.dirty = true;
                    pte.soft_dirty = true;
                }
                ptl.set_pte(page, pte);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

impl Mm {
    /// A CPU fault at `addr` (Linux `handle_mm_fault`), resolved until the
    /// access is allowed.
    ///
    /// # Errors
    /// [`Error::NotMapped`] (SIGSEGV), [`Error::Protection`],
    /// [`Error::OutOfMemory`], [`Error::OomReaped`].
    pub fn fault(&self, addr: u64, write: bool) -> Result<()> {
        let g = self.mmap_read();
        let access = if write { Access::Write } else { Access::Read };
        g.mm.fault_in(addr & !(PAGE_SIZE - 1), access).map(|_| ())
    }

    /// CPU load of `buf.len()` bytes at `addr`, faulting as needed.
    ///
    /// # Errors
    /// As [`fault`](Self::fault).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        check_span(addr, buf.len())?;
        let g = self.mmap_read();
        let phys = &g.mm.phys;
        g.mm.cpu_access(addr, buf.len(), Access::Read, |pfn, off, done, n| {
            phys.read_frame(phys.frame_ref(pfn), off, &mut buf[done..done + n])
        })
    }

    /// CPU store of `data` at `addr`, faulting (and breaking COW) as needed.
    ///
    /// # Errors
    /// As [`fault`](Self::fault).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        check_span(addr, data.len())?;
        let g = self.mmap_read();
        let phys = &g.mm.phys;
        g.mm.cpu_access(addr, data.len(), Access::Write, |pfn, off, done, n| {
            phys.write_frame(phys.frame_ref(pfn), off, &data[done..done + n])
        })
    }

    /// Reads a little-endian `u64` at `addr` (8-byte aligned).
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u64` at `addr`.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn write_u64(&self, addr: u64, v: u64) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }
}

fn check_span(addr: u64, len: usize) -> Result<()> {
    match addr.checked_add(len as u64) {
        Some(e) if e <= crate::mm::TASK_SIZE => Ok(()),
        _ => Err(Error::InvalidRange {
            addr,
            len: len as u64,
        }),
    }
}
