//! Secondary-side entry points: `range_fault` (Linux `hmm_range_fault`) and
//! `pin` / `unpin` (Linux `pin_user_pages` / `unpin_user_pages`).

use mmu_notifier::sync::{AtomicBool, Ordering};

use mmu_notifier::{IntervalNotifier, Owner};

use crate::error::{Error, Result};
use crate::mm::{check_range, Mm, MmGrab, MmapRead};
use crate::pfn::{FrameRef, ZERO_PFN};
use crate::pte::Access;
use crate::pte::PteKind;
use crate::trace::Op;
use crate::PAGE_SIZE;

/// Pages one `range_fault` call may cover (its output is one entry per
/// page); larger ranges are [`Error::InvalidRange`].
pub const MAX_RANGE_PAGES: usize = 1 << 22;

/// [`HmmPfn::order`] of a page a PMD entry maps.
pub const PMD_ORDER: u8 = 9;

/// One page of a [`HmmRange`] result (Linux `hmm_pfns[i]`). All false/none
/// means "not present but faultable" (the value 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmmPfn {
    /// The frame, when `valid`.
    pub frame: Option<FrameRef>,
    /// `HMM_PFN_VALID`.
    pub valid: bool,
    /// `HMM_PFN_WRITE`.
    pub write: bool,
    /// `HMM_PFN_ERROR`: no VMA or an unreadable one.
    pub error: bool,
    /// The frame is the shared zero page.
    pub zero: bool,
    /// A device-private frame of this owner (only the caller's own device
    /// is reported valid).
    pub device: Option<Owner>,
    /// Mapping order of the primary's entry (Linux
    /// `hmm_pfn_to_map_order`): 9 for a page of a PMD mapping (a
    /// transparent huge page), 0 for a PTE. A device may map the whole
    /// aligned 2 MiB block at once when it is 9.
    pub order: u8,
}

/// The request of one `range_fault` call (Linux `struct hmm_range` with
/// `default_flags`; per-page request flags are not modelled).
#[derive(Debug)]
pub struct HmmRange<'n> {
    /// The interval notifier covering the range.
    pub notifier: &'n IntervalNotifier,
    /// From `notifier.read_begin()`.
    pub notifier_seq: u64,
    /// First address (page aligned).
    pub start: u64,
    /// End address (page aligned, exclusive).
    pub end: u64,
    /// `HMM_PFN_REQ_FAULT`: fault in missing pages.
    pub fault: bool,
    /// `HMM_PFN_REQ_WRITE`: fault for writing.
    pub write: bool,
    /// `dev_private_owner`: device-private pages of this owner are reported
    /// instead of faulted back.
    pub dev_private_owner: Option<Owner>,
    /// Output, one per page.
    pub pfns: Vec<HmmPfn>,
}

impl<'n> HmmRange<'n> {
    /// A request for `[start, end)` with the given sequence.
    pub fn new(notifier: &'n IntervalNotifier, notifier_seq: u64, start: u64, end: u64) -> Self {
        HmmRange {
            notifier,
            notifier_seq,
            start,
            end,
            fault: false,
            write: false,
            dev_private_owner: None,
            pfns: Vec::new(),
        }
    }
}

impl MmapRead<'_> {
    /// Linux `hmm_range_fault`: walks `[range.start, range.end)` under this
    /// mmap read lock (the receiver: the lock cannot be forgotten, nor be
    /// another address space's), faulting pages when asked, and fills
    /// `range.pfns`.
    /// After each fault the walk restarts at the faulting page and first
    /// checks the notifier sequence, so a collision caused by the fault (or
    /// by anyone else) is reported as [`Error::Busy`].
    ///
    /// # Errors
    /// [`Error::Busy`] (retry with a new sequence); [`Error::Protection`]
    /// with `access == "write"` for a write request on a read-only VMA
    /// (`-EPERM`); [`Error::NotMapped`] or a read [`Error::Protection`] when
    /// a fault was requested where there is no readable VMA (`-EFAULT`);
    /// [`Error::OutOfMemory`]; [`Error::InvalidRange`];
    /// [`Error::ForeignNotifier`] when `range.notifier` is another address
    /// space's.
    pub fn range_fault(&self, range: &mut HmmRange<'_>) -> Result<()> {
        let mm = self.mm;
        if range.notifier.mm_id() != mm.subs.id() {
            return Err(Error::ForeignNotifier);
        }
        if range.end <= range.start {
            return Err(Error::InvalidRange {
                addr: range.start,
                len: 0,
            });
        }
        let (start, end) = check_range(range.start, range.end - range.start)?;
        mm.trace.record(Op::RangeFault, None, start, end);
        let n = ((end - start) / PAGE_SIZE) as usize;
        if n > MAX_RANGE_PAGES {
            return Err(Error::InvalidRange {
                addr: start,
                len: end - start,
            });
        }
        range.pfns.clear();
        range.pfns.resize(n, HmmPfn::default());
        let access = if range.write {
            Access::Write
        } else {
            Access::Read
        };
        let mut addr = start;
        'walk: loop {
            if range.notifier.check_retry(range.notifier_seq) {
                return Err(Error::Busy);
            }
            while addr < end {
                let i = ((addr - start) / PAGE_SIZE) as usize;
                let found = mm.vmas_read().find(addr).cloned();
                let exists = found.is_some();
                let Some(vma) = found.filter(|v| v.prot.read) else {
                    if range.fault {
                        return Err(match exists {
                            false => Error::NotMapped {
                                addr,
                                why: "no VMA",
                            },
                            true => Error::Protection {
                                addr,
                                access: "read",
                            },
                        });
                    }
                    range.pfns[i] = HmmPfn {
                        error: true,
                        ..HmmPfn::default()
                    };
                    addr += PAGE_SIZE;
                    continue;
                };
                if range.fault && range.write && !vma.prot.write {
                    return Err(Error::Protection {
                        addr,
                        access: "write",
                    });
                }
                let ptl = mm.ptl();
                let pte = ptl.get_pte(addr);
                let order = if ptl.get_pmd(addr).is_some() {
                    PMD_ORDER
                } else {
                    0
                };
                let needs_fault = match pte.map(|p| p.kind) {
                    None | Some(PteKind::Swap { .. }) => true,
                    Some(PteKind::Present { pfn }) => {
                        let p = pte.expect("matched Some");
                        if range.write && !p.write {
                            true
                        } else {
                            range.pfns[i] = HmmPfn {
                                frame: Some(mm.phys.frame_ref(pfn)),
                                valid: true,
                                write: p.write,
                                zero: pfn == ZERO_PFN,
                                order,
                                ..HmmPfn::default()
                            };
                            false
                        }
                    }
                    Some(PteKind::DevicePrivate { pfn, owner })
                        if Some(owner) == range.dev_private_owner =>
                    {
                        range.pfns[i] = HmmPfn {
                            frame: Some(mm.phys.frame_ref(pfn)),
                            valid: true,
                            write: pte.is_some_and(|p| p.write),
                            device: Some(owner),
                            ..HmmPfn::default()
                        };
                        false
                    }
                    Some(PteKind::DevicePrivate { .. }) | Some(PteKind::DeviceExclusive { .. }) => {
                        true
                    }
                    Some(PteKind::Migration { .. }) => {
                        if range.fault {
                            ptl.wait_migration();
                            continue 'walk;
                        }
                        true
                    }
                };
                drop(ptl);
                if needs_fault {
                    if !range.fault {
                        range.pfns[i] = HmmPfn::default();
                    } else {
                        mm.handle_fault(addr, access)?;
                        continue 'walk;
                    }
                }
                addr += PAGE_SIZE;
            }
            return Ok(());
        }
    }
}

impl Mm {
    /// Pins `npages` pages from `addr` (Linux `pin_user_pages` with
    /// `FOLL_LONGTERM`): each page is faulted in (for writing if `write`,
    /// which breaks COW; device-private pages migrate back), then pinned. A
    /// pinned frame is never freed while pinned, even after munmap; the
    /// address space may map something else there later.
    ///
    /// # Errors
    /// The fault errors of [`fault`](Mm::fault); [`Error::InvalidRange`].
    pub fn pin(&self, addr: u64, npages: u64, write: bool) -> Result<PinnedPages> {
        let (start, end) = check_range(addr, npages.saturating_mul(PAGE_SIZE))?;
        let g = self.mmap_read();
        let mm = g.mm;
        mm.trace.record(Op::Pin, None, start, end);
        let access = if write { Access::Write } else { Access::Read };
        let mut pin = PinnedPages {
            mm: self.grab(),
            start,
            write,
            frames: Vec::new(),
            released: AtomicBool::new(false),
        };
        let mut a = start;
        while a < end {
            mm.fault_in(a, access)?;
            let ptl = mm.ptl();
            let Some(pfn) = ptl
                .get_pte(a)
                .filter(|p| p.read && (!write || p.write))
                .and_then(|p| p.present_pfn())
            else {
                continue;
            };
            mm.phys.pin(pfn);
            pin.frames.push(mm.phys.frame_ref(pfn));
            a += PAGE_SIZE;
        }
        Ok(pin)
    }
}

/// Pinned pages (Linux `FOLL_PIN`); [`unpin`](PinnedPages::unpin) or drop releases
/// them.
#[derive(Debug)]
pub struct PinnedPages {
    pub(crate) mm: MmGrab,
    start: u64,
    write: bool,
    frames: Vec<FrameRef>,
    released: AtomicBool,
}

impl PinnedPages {
    /// First address pinned.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Bytes pinned.
    pub fn len(&self) -> u64 {
        self.frames.len() as u64 * PAGE_SIZE
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Pinned for writing.
    pub fn writable(&self) -> bool {
        self.write
    }

    /// The pinned frames, one per page.
    pub fn frames(&self) -> &[FrameRef] {
        &self.frames
    }

    /// The frame pinned for `vaddr`, if inside the pin.
    pub fn frame_at(&self, vaddr: u64) -> Option<FrameRef> {
        let i = vaddr.checked_sub(self.start)? / PAGE_SIZE;
        self.frames.get(usize::try_from(i).ok()?).copied()
    }

    /// Whether [`unpin`](Self::unpin) ran.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Releases the pins.
    ///
    /// # Errors
    /// [`Error::AlreadyUnpinned`] the second time.
    pub fn unpin(&self) -> Result<()> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyUnpinned);
        }
        for f in &self.frames {
            self.mm.inner.phys.unpin(f.pfn);
        }
        Ok(())
    }
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        let _ = self.unpin();
    }
}
