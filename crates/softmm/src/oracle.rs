//! The coherence oracle: checks a secondary's access at the moment it uses
//! a translation.
//!
//! An access through a secondary mapping is coherent when the primary maps
//! that frame at that address now with the needed permission, or a TLB may
//! still legitimately hold such an entry (it was downgraded and its flush
//! has not happened yet; the frame cannot have been freed then), or it is
//! the entry being installed by `set_pte_at_notify` (already announced to
//! `change_pte`). In every case the frame's generation must be current.
//! Pinned registrations are checked against the pin instead.
//!
//! Checking takes the page-table store lock (never the PTL), so secondaries
//! call it while holding their own locks.

use mmu_notifier::sync;

use crate::frame::HPAGE_PMD_NR;
use crate::hmm::PinnedPages;
use crate::mm::MmGrab;
use crate::pfn::FrameRef;
use crate::pte::Pte;
use crate::verdict::{Oracle, Violation, ViolationKind};
use crate::{PAGE_SIZE, PMD_SIZE};

/// Whether a secondary may access `vaddr` of `mm` through `frame` now: the
/// present PTE, an unflushed old one or the one `set_pte_at_notify` is
/// installing grants it, and the frame was not freed since.
fn page_verdict(
    mm: &MmGrab,
    vaddr: u64,
    frame: FrameRef,
    write: bool,
) -> Result<(), ViolationKind> {
    let inner = &mm.inner;
    let vpn = vaddr / PAGE_SIZE;
    let pt = inner.pt();
    let pending = sync::lock(&inner.pending)
        .filter(|&(v, _)| v == vpn)
        .map(|(_, p)| p);
    let mut verdict = match pt.get(vpn) {
        None => Err(ViolationKind::NotMapped),
        Some(p) => grants(&p, frame.pfn, write),
    };
    for alt in pending.into_iter().chain(pt.unflushed(vpn)) {
        if verdict.is_err() && grants(&alt, frame.pfn, write).is_ok() {
            verdict = Ok(());
        }
    }
    verdict.and_then(|()| {
        let gen = inner.phys.generation(frame.pfn);
        if gen == frame.gen {
            Ok(())
        } else {
            Err(ViolationKind::FrameFreed { current_gen: gen })
        }
    })
}

/// Whether `pte` lets an access to `pfn` happen.
fn grants(pte: &Pte, pfn: u64, write: bool) -> Result<(), ViolationKind> {
    let (mapped, read, writable) = pte.access();
    if mapped != Some(pfn) {
        return Err(ViolationKind::WrongFrame { mapped });
    }
    if (write && writable) || (!write && read) {
        Ok(())
    } else {
        Err(ViolationKind::Permission)
    }
}

impl Oracle {
    /// Checks that a secondary may access `vaddr` of `mm` through `frame`
    /// now (for writing if `write`). Call it at the moment of the access,
    /// with the secondary's own lock held.
    ///
    /// # Errors
    /// The [`Violation`], which is also counted and (the first few) kept.
    pub fn check_access(
        &self,
        mm: &MmGrab,
        vaddr: u64,
        frame: FrameRef,
        write: bool,
    ) -> Result<(), Box<Violation>> {
        self.count_check();
        let r = page_verdict(mm, vaddr, frame, write)
            .map_err(|kind| self.report(mm, vaddr, frame, write, kind));
        self.observe(mm.id(), vaddr, write, r.as_ref().err().map(|v| &**v));
        r
    }

    /// Checks an access through a secondary mapping of a whole transparent
    /// huge page: `vaddr` (2 MiB aligned) through `frames`, the 512 frames
    /// the device mapped there (as `range_fault` reported them, order 9).
    /// Coherent when every page is, as [`check_access`](Self::check_access)
    /// decides: a device that keeps its huge mapping after a change to any
    /// page of the block is caught, as one that maps the pages one by one.
    ///
    /// # Errors
    /// The [`Violation`] of the first incoherent page; a `frames` that is
    /// not 512 contiguous frames or a `vaddr` not 2 MiB aligned is reported
    /// as [`ViolationKind::WrongFrame`] at `vaddr`.
    pub fn check_access_huge(
        &self,
        mm: &MmGrab,
        vaddr: u64,
        frames: &[FrameRef],
        write: bool,
    ) -> Result<(), Box<Violation>> {
        self.count_check();
        let first = frames
            .first()
            .copied()
            .unwrap_or(FrameRef { pfn: 0, gen: 0 });
        let shaped = vaddr % PMD_SIZE == 0
            && frames.len() as u64 == HPAGE_PMD_NR
            && frames.iter().zip(first.pfn..).all(|(f, p)| f.pfn == p);
        let r = if shaped {
            frames.iter().enumerate().try_for_each(|(i, &f)| {
                let a = vaddr + i as u64 * PAGE_SIZE;
                page_verdict(mm, a, f, write).map_err(|kind| self.report(mm, a, f, write, kind))
            })
        } else {
            let kind = ViolationKind::WrongFrame { mapped: None };
            Err(self.report(mm, vaddr, first, write, kind))
        };
        self.observe(mm.id(), vaddr, write, r.as_ref().err().map(|v| &**v));
        r
    }

    /// Checks an access through a pinned registration: `vaddr` must be in
    /// the pin, the pin not released, the frame still pinned and of the same
    /// generation, and a write needs a pin for writing. (Whether the
    /// primary still maps that frame there is a separate question: ask
    /// [`check_access`](Self::check_access).)
    ///
    /// # Errors
    /// The [`Violation`].
    pub fn check_pinned(
        &self,
        pin: &PinnedPages,
        vaddr: u64,
        write: bool,
    ) -> Result<(), Box<Violation>> {
        self.count_check();
        let phys = &pin.mm.inner.phys;
        let frame = pin.frame_at(vaddr);
        let ok = match frame {
            Some(f) => {
                !pin.is_released()
                    && (!write || pin.writable())
                    && phys.is_current(f)
                    && phys.pincount(f.pfn) > 0
            }
            None => false,
        };
        if ok {
            self.observe(pin.mm.id(), vaddr, write, None);
            return Ok(());
        }
        let f = frame.unwrap_or(FrameRef { pfn: 0, gen: 0 });
        let v = self.report(&pin.mm, vaddr, f, write, ViolationKind::NotPinned);
        self.observe(pin.mm.id(), vaddr, write, Some(&v));
        Err(v)
    }

    fn report(
        &self,
        mm: &MmGrab,
        vaddr: u64,
        frame: FrameRef,
        write: bool,
        kind: ViolationKind,
    ) -> Box<Violation> {
        let v = Box::new(Violation {
            mm: mm.id(),
            vaddr,
            frame,
            write,
            kind,
            pte: mm.pte(vaddr),
            trace: mm.inner.trace.recent(),
        });
        self.keep(&v);
        v
    }
}
