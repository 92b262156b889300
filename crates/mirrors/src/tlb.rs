//! `SecondaryTlb`: the IOMMU SVA pattern. The device shares the
//! CPU page table: its TLB is filled by walking it (page requests fault the
//! primary), and flushed only by `arch_invalidate_secondary_tlbs`, which the
//! primary calls from every TLB flush. No start/end callbacks at all.
//!
//! The walk and the fill happen under the TLB lock, and the flush takes the
//! same lock, so a fill can never resurrect an entry a flush has removed
//! (hardware gets the same guarantee from its invalidation queue).

use std::collections::BTreeMap;
use std::sync::Arc;

use mmu_notifier::sync::{AtomicU64, CheckedMutex, MutexGuard, Ordering};

use mmu_notifier::{Callbacks, MmuNotifier, NotifierHandle};
use softmm::{FrameRef, PAGE_SIZE};

use crate::primary::{FramePrimary, MirrorError, Result};

/// Page requests before giving up on one access.
const MAX_PAGE_REQUESTS: u32 = 1000;

#[derive(Default)]
struct Tlb {
    entries: BTreeMap<u64, (FrameRef, bool)>,
    released: bool,
}

/// Counters of one secondary TLB.
#[derive(Debug, Default)]
pub struct TlbStats {
    /// Accesses that hit.
    pub hits: AtomicU64,
    /// Fills by a page-table walk.
    pub walks: AtomicU64,
    /// Page requests (faults of the primary).
    pub page_requests: AtomicU64,
    /// Flush callbacks.
    pub flushes: AtomicU64,
}

struct TlbShared<P> {
    primary: P,
    tlb: CheckedMutex<Tlb>,
    stats: TlbStats,
}

impl<P: FramePrimary> TlbShared<P> {
    fn lock(&self) -> MutexGuard<'_, Tlb> {
        // A spinlock, as in Linux: taken in callbacks that must not sleep.
        self.tlb.spin_lock()
    }
}

/// An SVA device TLB over one address space.
pub struct SecondaryTlb<P: FramePrimary> {
    inner: Arc<TlbShared<P>>,
    handle: NotifierHandle,
}

impl<P: FramePrimary> std::fmt::Debug for SecondaryTlb<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecondaryTlb")
            .field("stats", &self.inner.stats)
            .finish()
    }
}

impl<P: FramePrimary> SecondaryTlb<P> {
    /// Binds a device to the address space (`iommu_sva_bind_device`).
    ///
    /// # Errors
    /// [`MirrorError::Notifier`] if the address space exited.
    pub fn bind(primary: P) -> Result<Self> {
        let inner = Arc::new(TlbShared {
            primary,
            tlb: CheckedMutex::new(Tlb::default()),
            stats: TlbStats::default(),
        });
        let handle = inner.primary.subscriptions().register(inner.clone())?;
        Ok(SecondaryTlb { inner, handle })
    }

    /// The counters.
    pub fn stats(&self) -> &TlbStats {
        &self.inner.stats
    }

    /// Entries cached now.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether the TLB is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A DMA of one byte at the start of the page of `addr` (a store if
    /// `store` is given), translated by the TLB, filled by a walk, faulting
    /// the primary through a page request when the walk finds nothing
    /// suitable. Returns the byte read (or written).
    ///
    /// # Errors
    /// The primary's fault errors (the device would get a page-request
    /// failure); [`MirrorError::Violation`]; [`MirrorError::Released`].
    pub fn access(&self, addr: u64, store: Option<u8>) -> Result<u8> {
        let page = addr & !(PAGE_SIZE - 1);
        let write = store.is_some();
        let p = &self.inner.primary;
        for _ in 0..MAX_PAGE_REQUESTS {
            {
                let mut tlb = self.inner.lock();
                if tlb.released {
                    return Err(MirrorError::Released);
                }
                let hit = tlb.entries.get(&page).copied().filter(|e| !write || e.1);
                let entry = match hit {
                    Some(e) => {
                        self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
                        Some(e)
                    }
                    None => {
                        let walked = p.walk(page).filter(|e| !write || e.1);
                        if let Some(e) = walked {
                            self.inner.stats.walks.fetch_add(1, Ordering::Relaxed);
                            tlb.entries.insert(page, e);
                        }
                        walked
                    }
                };
                if let Some((frame, _)) = entry {
                    p.check_access(page, frame, write)?;
                    let mut b = [0u8];
                    match store {
                        Some(v) => p.dma_write(frame, 0, &[v])?,
                        None => p.dma_read(frame, 0, &mut b)?,
                    }
                    return Ok(store.unwrap_or(b[0]));
                }
            }
            // Page request: fault the primary without the TLB lock.
            self.inner
                .stats
                .page_requests
                .fetch_add(1, Ordering::Relaxed);
            p.fault_page(page, write)?;
        }
        Err(MirrorError::Busy)
    }
}

impl<P: FramePrimary> Drop for SecondaryTlb<P> {
    fn drop(&mut self) {
        let _ = self.inner.primary.subscriptions().unregister(&self.handle);
    }
}

impl<P: FramePrimary> MmuNotifier for TlbShared<P> {
    fn callbacks(&self) -> Callbacks {
        Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS | Callbacks::RELEASE
    }

    fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let mut tlb = self.lock();
        if start == 0 && end == u64::MAX {
            tlb.entries.clear();
            return;
        }
        let keys: Vec<u64> = tlb.entries.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            tlb.entries.remove(&k);
        }
    }

    fn release(&self) {
        // Stop translation (quiet PASID entry), then flush everything.
        let mut tlb = self.lock();
        tlb.released = true;
        tlb.entries.clear();
    }
}
