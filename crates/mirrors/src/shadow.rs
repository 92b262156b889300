//! `ShadowMmu`: the KVM pattern. Shadow PTEs are installed by a
//! fault path that samples a sequence number, resolves the page through the
//! primary (which may sleep), then takes the MMU lock and retries if an
//! invalidation is in progress over the address or has completed since.
//!
//! ```
//! use mirrors::ShadowMmu;
//! use softmm::{MapKind, Mm, PhysMem, Prot};
//! let phys = PhysMem::new(64);
//! let mm = Mm::new(&phys);
//! let a = mm.mmap(4096, Prot::RW, MapKind::AnonPrivate).unwrap();
//! let kvm = ShadowMmu::attach(mm.grab()).unwrap();
//! kvm.fault(a, true).unwrap();
//! kvm.write(a, 7).unwrap();
//! assert_eq!(mm.read_u64(a).unwrap() & 0xff, 7);
//! mm.munmap(a, 4096).unwrap();          // zaps the shadow PTE first
//! assert_eq!(kvm.read(a).unwrap(), None); // the guest would fault now
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use mmu_notifier::sync::{AtomicU64, CheckedMutex, MutexGuard, Ordering};

use mmu_notifier::{Again, Callbacks, MmuNotifier, NotifierHandle, PteValue, Range};
use softmm::{FrameRef, PAGE_SIZE};

use crate::primary::{FramePrimary, MirrorError, Result};

#[derive(Clone, Copy, Debug)]
struct Spte {
    frame: FrameRef,
    writable: bool,
    young: bool,
}

/// State under `mmu_lock` (KVM: `kvm->mmu_lock`).
#[derive(Default)]
struct MmuState {
    in_progress: i64,
    seq: u64,
    range_start: u64,
    range_end: u64,
    sptes: BTreeMap<u64, Spte>,
    released: bool,
}

/// Counters of one shadow MMU.
#[derive(Debug, Default)]
pub struct ShadowStats {
    /// Faults that installed an SPTE.
    pub faults: AtomicU64,
    /// Fault retries caused by invalidations.
    pub retries: AtomicU64,
    /// SPTEs zapped by invalidations.
    pub zapped: AtomicU64,
    /// SPTEs repointed by `change_pte`.
    pub change_pte: AtomicU64,
    /// Guest accesses checked by the oracle.
    pub accesses: AtomicU64,
}

struct ShadowShared<P> {
    primary: P,
    mmu_lock: CheckedMutex<MmuState>,
    stats: ShadowStats,
}

/// A KVM-style shadow MMU over one primary address space.
pub struct ShadowMmu<P: FramePrimary> {
    inner: Arc<ShadowShared<P>>,
    handle: NotifierHandle,
}

impl<P: FramePrimary> std::fmt::Debug for ShadowMmu<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowMmu")
            .field("stats", &self.inner.stats)
            .finish()
    }
}

/// Retry bound of the fault path (a guest would spin; we report).
const MAX_RETRIES: u32 = 10_000;

impl<P: FramePrimary> ShadowShared<P> {
    fn lock(&self) -> MutexGuard<'_, MmuState> {
        // A spinlock, as in Linux: taken in callbacks that must not sleep.
        self.mmu_lock.spin_lock()
    }
}

impl<P: FramePrimary> ShadowMmu<P> {
    /// Registers a shadow MMU on `primary` (Linux `mmu_notifier_register`
    /// from `kvm_create_vm`).
    ///
    /// # Errors
    /// [`MirrorError::Notifier`] if the address space exited.
    pub fn attach(primary: P) -> Result<Self> {
        let inner = Arc::new(ShadowShared {
            primary,
            mmu_lock: CheckedMutex::new(MmuState::default()),
            stats: ShadowStats::default(),
        });
        let handle = inner.primary.subscriptions().register(inner.clone())?;
        Ok(ShadowMmu { inner, handle })
    }

    /// The counters.
    pub fn stats(&self) -> &ShadowStats {
        &self.inner.stats
    }

    /// Number of shadow PTEs installed now.
    pub fn spte_count(&self) -> usize {
        self.inner.lock().sptes.len()
    }

    /// The guest fault path (x86 `kvm_faultin_pfn` + `direct_page_fault`).
    ///
    /// # Errors
    /// The primary's fault errors; [`MirrorError::Released`] after exit;
    /// [`MirrorError::Busy`] after too many retries.
    pub fn fault(&self, addr: u64, write: bool) -> Result<()> {
        let page = addr & !(PAGE_SIZE - 1);
        for _ in 0..MAX_RETRIES {
            let mmu_seq = {
                let st = self.inner.lock();
                if st.released {
                    return Err(MirrorError::Released);
                }
                st.seq
            };
            // May sleep and fault the primary.
            let (frame, writable) = self.inner.primary.fault_page(page, write)?;
            let mut st = self.inner.lock();
            if st.released {
                return Err(MirrorError::Released);
            }
            // mmu_invalidate_retry_hva
            let in_range = page >= st.range_start && page < st.range_end;
            if (st.in_progress != 0 && in_range) || st.seq != mmu_seq {
                self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            st.sptes.insert(
                page,
                Spte {
                    frame,
                    writable: writable && write,
                    young: true,
                },
            );
            self.inner.stats.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        Err(MirrorError::Busy)
    }

    /// A guest load of the first byte of the page at `addr` through the
    /// shadow PTE, checked by the oracle. `None`: no SPTE (the guest faults).
    ///
    /// # Errors
    /// [`MirrorError::Violation`] for a stale SPTE.
    pub fn read(&self, addr: u64) -> Result<Option<u8>> {
        self.access(addr, None)
    }

    /// A guest store of `val` into the first byte of the page at `addr`.
    /// `Ok(false)`: no writable SPTE (the guest faults).
    ///
    /// # Errors
    /// [`MirrorError::Violation`] for a stale SPTE.
    pub fn write(&self, addr: u64, val: u8) -> Result<bool> {
        Ok(self.access(addr, Some(val))?.is_some())
    }

    fn access(&self, addr: u64, store: Option<u8>) -> Result<Option<u8>> {
        let page = addr & !(PAGE_SIZE - 1);
        let mut st = self.inner.lock();
        let Some(spte) = st.sptes.get_mut(&page) else {
            return Ok(None);
        };
        if store.is_some() && !spte.writable {
            return Ok(None);
        }
        spte.young = true;
        let frame = spte.frame;
        self.inner.stats.accesses.fetch_add(1, Ordering::Relaxed);
        let p = &self.inner.primary;
        p.check_access(page, frame, store.is_some())?;
        let mut b = [0u8];
        match store {
            Some(v) => p.dma_write(frame, 0, &[v])?,
            None => p.dma_read(frame, 0, &mut b)?,
        }
        Ok(Some(store.unwrap_or(b[0])))
    }

    /// Whether an invalidation is in progress (`mmu_invalidate_in_progress`).
    pub fn invalidate_in_progress(&self) -> i64 {
        self.inner.lock().in_progress
    }
}

impl<P: FramePrimary> Drop for ShadowMmu<P> {
    fn drop(&mut self) {
        // kvm_destroy_vm: unregister (calls release if exit did not).
        let _ = self.inner.primary.subscriptions().unregister(&self.handle);
    }
}

fn zap(st: &mut MmuState, start: u64, end: u64) -> usize {
    let keys: Vec<u64> = st.sptes.range(start..end).map(|(&k, _)| k).collect();
    for k in &keys {
        st.sptes.remove(k);
    }
    keys.len()
}

impl<P: FramePrimary> MmuNotifier for ShadowShared<P> {
    fn callbacks(&self) -> Callbacks {
        Callbacks::RELEASE
            | Callbacks::INVALIDATE_RANGE_START
            | Callbacks::INVALIDATE_RANGE_END
            | Callbacks::CLEAR_FLUSH_YOUNG
            | Callbacks::CLEAR_YOUNG
            | Callbacks::TEST_YOUNG
            | Callbacks::CHANGE_PTE
    }

    fn invalidate_range_start(&self, r: &Range) -> std::result::Result<(), Again> {
        // KVM never fails: the spinlock is taken even when not blockable.
        let mut st = self.lock();
        st.in_progress += 1;
        if st.in_progress == 1 {
            st.range_start = r.start();
            st.range_end = r.end();
        } else {
            st.range_start = st.range_start.min(r.start());
            st.range_end = st.range_end.max(r.end());
        }
        let n = zap(&mut st, r.start(), r.end());
        self.stats.zapped.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    fn invalidate_range_end(&self, _r: &Range) {
        let mut st = self.lock();
        st.seq += 1;
        st.in_progress -= 1;
        debug_assert!(st.in_progress >= 0);
    }

    fn change_pte(&self, addr: u64, pte: PteValue) {
        let mut st = self.lock();
        if st.in_progress == 0 {
            return;
        }
        let page = addr & !(PAGE_SIZE - 1);
        if !st.sptes.contains_key(&page) {
            return;
        }
        if pte.writable {
            // kvm_set_pte_rmap: a writable new PTE drops the SPTE.
            st.sptes.remove(&page);
        } else {
            let frame = self.primary.frame_of(pte.pfn);
            st.sptes.insert(
                page,
                Spte {
                    frame,
                    writable: false,
                    young: true,
                },
            );
        }
        self.stats.change_pte.fetch_add(1, Ordering::Relaxed);
    }

    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        self.clear_young(start, end)
    }

    fn clear_young(&self, start: u64, end: u64) -> bool {
        let mut st = self.lock();
        let mut young = false;
        for (_, s) in st.sptes.range_mut(start..end) {
            young |= std::mem::take(&mut s.young);
        }
        young
    }

    fn test_young(&self, addr: u64) -> bool {
        let st = self.lock();
        st.sptes
            .get(&(addr & !(PAGE_SIZE - 1)))
            .is_some_and(|s| s.young)
    }

    fn release(&self) {
        // kvm_flush_shadow_all
        let mut st = self.lock();
        let n = st.sptes.len();
        st.sptes.clear();
        st.released = true;
        self.stats.zapped.fetch_add(n as u64, Ordering::Relaxed);
    }
}
