//! The small interface mirrors use to reach their primary MMU, so the same
//! mirror code runs on the software MMU and (for registration caches) on a
//! real process.

use mmu_notifier::SubscriptionsRef;
use softmm::{FrameRef, MmGrab, PinnedPages, Violation};

/// Why a mirror operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The primary refused (bad range, no mapping, protection, exited...).
    #[error(transparent)]
    Primary(#[from] softmm::Error),
    /// The subsystem refused a registration.
    #[error(transparent)]
    Notifier(#[from] mmu_notifier::Error),
    /// A primary other than the software MMU (a real process) refused.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The coherence oracle caught an access through a stale translation.
    #[error("coherence violation: {0}")]
    Violation(Box<Violation>),
    /// The mirror was released (its address space exited) or detached.
    #[error("the mirror was released")]
    Released,
    /// Too many retries against concurrent invalidations (Linux
    /// `HMM_RANGE_DEFAULT_TIMEOUT` / `-EBUSY`).
    #[error("gave up after too many collisions with invalidations")]
    Busy,
    /// An access outside what the mirror covers (for a registration: outside
    /// `[start, start + len)`): bad input, not a coherence problem.
    #[error("address {addr:#x} is outside [{start:#x}, {end:#x})")]
    OutOfRange {
        /// The address asked for.
        addr: u64,
        /// First address covered.
        start: u64,
        /// One past the last address covered.
        end: u64,
    },
}

impl From<Box<Violation>> for MirrorError {
    fn from(v: Box<Violation>) -> Self {
        MirrorError::Violation(v)
    }
}

/// Result of mirror operations.
pub type Result<T> = std::result::Result<T, MirrorError>;

/// What every mirror needs from its primary MMU: the subscriptions, a way to
/// make sure invalidations for the ranges it mirrors are delivered, and
/// pinning. Implemented by the software MMU (`softmm::MmGrab`) and by real
/// processes (the `uffd` crate's `ProcessMm`).
pub trait Primary: Send + Sync + 'static {
    /// Pinned memory (Linux `FOLL_PIN` pages).
    type Pinned: Send + Sync + 'static;

    /// Kept for as long as an interval notifier over a range is inserted:
    /// whatever the primary needs to deliver invalidations for that range
    /// (nothing for the software MMU, whose core mm calls every hook; the
    /// userfaultfd registration for a real process).
    type Watch: Send + Sync + 'static;

    /// The address space's subscriptions (register / interval_insert here).
    fn subscriptions(&self) -> &SubscriptionsRef;

    /// Starts delivering invalidations for `[start, start + len)`; they
    /// stop when the returned value is dropped (and no other watch covers
    /// the range).
    ///
    /// # Errors
    /// The primary cannot observe that range.
    fn watch(&self, start: u64, len: u64) -> Result<Self::Watch>;

    /// Waits until every invalidation for a change that has already returned
    /// to its caller (a munmap, mremap, madvise...) has been delivered. A
    /// primary whose hooks run inside the change itself (the software MMU,
    /// Linux) has nothing to wait for.
    ///
    /// # Errors
    /// The primary can no longer deliver invalidations (it exited).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Pins `len` bytes from `start`.
    ///
    /// # Errors
    /// The primary's fault errors.
    fn pin(&self, start: u64, len: u64, write: bool) -> Result<Self::Pinned>;
}

/// What mirrors that translate to frames need on top of [`Primary`]: the
/// software MMU's frames, its page-table walker and its coherence oracle.
pub trait FramePrimary: Primary {
    /// Faults `addr` in (for writing if `write`) and returns the frame it
    /// maps and whether it is writable, without keeping a reference (KVM's
    /// `hva_to_pfn` followed by the release of the page).
    ///
    /// # Errors
    /// The primary's fault errors.
    fn fault_page(&self, addr: u64, write: bool) -> Result<(FrameRef, bool)>;

    /// What the CPU page table maps at `addr` now, as a hardware walker sees
    /// it: the frame and whether it is writable; `None` if not present.
    fn walk(&self, addr: u64) -> Option<(FrameRef, bool)>;

    /// The frame a `change_pte` pfn refers to now.
    fn frame_of(&self, pfn: u64) -> FrameRef;

    /// The frame pinned for `addr`.
    fn pinned_frame(&self, pinned: &Self::Pinned, addr: u64) -> Option<FrameRef>;

    /// The oracle's verdict on a secondary access through `frame`.
    ///
    /// # Errors
    /// [`MirrorError::Violation`].
    fn check_access(&self, addr: u64, frame: FrameRef, write: bool) -> Result<()>;

    /// The oracle's verdict on an access through a pinned registration.
    ///
    /// # Errors
    /// [`MirrorError::Violation`].
    fn check_pinned(&self, pinned: &Self::Pinned, addr: u64, write: bool) -> Result<()>;

    /// A device load from `frame` (DMA).
    ///
    /// # Errors
    /// [`MirrorError::Primary`] for a stale frame.
    fn dma_read(&self, frame: FrameRef, offset: usize, buf: &mut [u8]) -> Result<()>;

    /// A device store into `frame` (DMA).
    ///
    /// # Errors
    /// [`MirrorError::Primary`] for a stale frame.
    fn dma_write(&self, frame: FrameRef, offset: usize, data: &[u8]) -> Result<()>;
}

impl Primary for MmGrab {
    type Pinned = PinnedPages;
    /// The software MMU calls every hook itself: nothing to set up.
    type Watch = ();

    fn subscriptions(&self) -> &SubscriptionsRef {
        MmGrab::subscriptions(self)
    }

    fn watch(&self, _start: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn pin(&self, start: u64, len: u64, write: bool) -> Result<PinnedPages> {
        let mm = self.get()?;
        Ok(mm.pin(start, len.div_ceil(softmm::PAGE_SIZE), write)?)
    }
}

impl FramePrimary for MmGrab {
    fn fault_page(&self, addr: u64, write: bool) -> Result<(FrameRef, bool)> {
        let mm = self.get()?;
        let pin = mm.pin(addr & !(softmm::PAGE_SIZE - 1), 1, write)?;
        let f = pin.frames()[0];
        let writable = mm
            .pte(addr)
            .is_some_and(|p| p.write && p.pfn() == Some(f.pfn));
        Ok((f, writable))
    }

    fn walk(&self, addr: u64) -> Option<(FrameRef, bool)> {
        let pte = self.pte(addr)?;
        let pfn = pte.present_pfn().filter(|_| pte.read)?;
        Some((self.phys().frame_ref(pfn), pte.write))
    }

    fn frame_of(&self, pfn: u64) -> FrameRef {
        self.phys().frame_ref(pfn)
    }

    fn pinned_frame(&self, pinned: &PinnedPages, addr: u64) -> Option<FrameRef> {
        pinned.frame_at(addr)
    }

    fn check_access(&self, addr: u64, frame: FrameRef, write: bool) -> Result<()> {
        Ok(self
            .phys()
            .oracle()
            .check_access(self, addr, frame, write)?)
    }

    fn check_pinned(&self, pinned: &PinnedPages, addr: u64, write: bool) -> Result<()> {
        Ok(self.phys().oracle().check_pinned(pinned, addr, write)?)
    }

    fn dma_read(&self, frame: FrameRef, offset: usize, buf: &mut [u8]) -> Result<()> {
        Ok(self.phys().read_frame(frame, offset, buf)?)
    }

    fn dma_write(&self, frame: FrameRef, offset: usize, data: &[u8]) -> Result<()> {
        Ok(self.phys().write_frame(frame, offset, data)?)
    }
}
