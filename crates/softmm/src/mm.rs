//! The address space: handles with Linux's `mm_users` / `mm_count`
//! semantics, the mmap and page-table locks, the page-table store, and the
//! helpers every operation uses (invalidation pairs, TLB flush, mmu_gather).
//!
//! # Locking, in a few lines
//!
//! * The **mmap lock** is the subsystem's own ([`SubscriptionsRef::mmap_write`]),
//!   so `register` / `interval_insert` exclude VMA changes exactly as in
//!   Linux. Writers: mmap, munmap, mremap, mprotect, fork, exit. Readers:
//!   faults, madvise, reclaim, migration, KSM, soft-dirty, range_fault, pin.
//! * **Invalidation starts are never called with the PTL held**: callbacks may
//!   sleep and may wait for device threads that call `range_fault`.
//! * The **PTL** (`ptl`) serialises every read-modify-write of PTEs, which
//!   are methods of its guard ([`Ptl`]): none can be made without it. It is
//!   held across `change_pte`, the young callbacks and the secondary-TLB
//!   flush, as in Linux, so those callbacks must not call back into the
//!   primary. Reads without it are named so (`pte_lockless`,
//!   `ptes_lockless`) and re-checked under it before anything changes.
//! * Operations that need the mmap lock for writing (`do_munmap`,
//!   `move_vma`, `change_protection`) are methods of its guard,
//!   [`MmapWrite`].
//! * The **page-table store** (`pt`) is the memory the PTEs live in: a leaf
//!   lock, never held across a call out. The oracle (like a hardware walker)
//!   reads it without the PTL, which is what lets a secondary check an
//!   access while holding its own lock.
//!
//! Order: mmap lock → (invalidation callbacks) → PTL → secondary locks taken
//! in PTL-held callbacks → page-table store → frame metadata.

use std::sync::Arc;

use mmu_notifier::sync::{
    self, lock, AtomicBool, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering, RwLock,
    RwLockReadGuard, RwLockWriteGuard,
};

use mmu_notifier::{
    ActiveInvalidation, Event, MmapReadGuard, MmapWriteGuard, Owner, Range, Subscriptions,
    SubscriptionsRef,
};

use crate::error::{Error, Result};
use crate::frame::{PhysMem, HPAGE_PMD_NR};
use crate::pte::{PageTable, Pte, PteKind, PMD_SIZE};
use crate::trace::{Op, Trace, TraceEntry};
use crate::vma::Vmas;
use crate::PAGE_SIZE;

/// One past the highest user address (47-bit user space, as x86-64).
pub const TASK_SIZE: u64 = 1 << 47;

/// Lowest address `mmap` picks when not given one.
pub const MMAP_BASE: u64 = 0x1000_0000;

/// Frames released by one mmu_gather batch before the TLB is flushed and
/// they are freed, even inside an invalidation (Linux frees full batches in
/// `tlb_flush_mmu` between start and end; secondaries must therefore drop
/// their mappings in `invalidate_range_start`, not in `end`).
pub const GATHER_BATCH: usize = 32;

pub(crate) struct MmInner {
    pub(crate) subs: Subscriptions,
    pub(crate) phys: Arc<PhysMem>,
    users: AtomicUsize,
    exited: AtomicBool,
    pub(crate) oom_reaped: AtomicBool,
    /// VMAs; changed only with the mmap lock held for writing (the RwLock
    /// is a leaf lock for the data, the mmap lock is the real exclusion).
    pub(crate) vmas: RwLock<Vmas>,
    /// Page-table lock.
    pub(crate) ptl: Mutex<()>,
    /// Page-table store (vpn → PTE; absent means `pte_none`) with the
    /// not-yet-flushed old entries.
    pub(crate) pt: Mutex<PageTable>,
    /// A PTE being installed by `set_pte_at_notify` (announced to
    /// `change_pte` before it is written): the oracle accepts it.
    pub(crate) pending: Mutex<Option<(u64, Pte)>>,
    /// Waiters for migration entries to go away.
    pub(crate) migration_wq: Condvar,
    pub(crate) trace: Trace,
}

/// A user reference to an address space (Linux `mmget` / `mm_users`):
/// operations are methods of it. Cloning takes another user reference; when
/// the last one is dropped the address space exits (notifier `release`,
/// then the UNMAP of everything, then its frames are freed).
///
/// ```
/// use softmm::{Mm, PhysMem, Prot, MapKind};
/// let phys = PhysMem::new(64);
/// let mm = Mm::new(&phys);
/// let a = mm.mmap(2 * 4096, Prot::RW, MapKind::AnonPrivate).unwrap();
/// mm.write(a, b"hello").unwrap();
/// let mut buf = [0u8; 5];
/// mm.read(a, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// let grab = mm.grab();
/// drop(mm); // last user: exit
/// assert!(grab.get().is_err());
/// ```
pub struct Mm {
    grab: MmGrab,
    /// This user reference was already dropped by [`Mm::exit`].
    put: AtomicBool,
}

/// A reference that keeps the address space's structure alive without
/// keeping it running (Linux `mmgrab` / `mm_count`): what a secondary MMU
/// holds. [`get`](MmGrab::get) is `mmget_not_zero`.
#[derive(Clone)]
pub struct MmGrab {
    pub(crate) inner: Arc<MmInner>,
}

impl std::fmt::Debug for Mm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mm({})", self.id())
    }
}

impl std::fmt::Debug for MmGrab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmGrab({})", self.id())
    }
}

impl std::ops::Deref for Mm {
    type Target = MmGrab;
    fn deref(&self) -> &MmGrab {
        &self.grab
    }
}

impl Clone for Mm {
    fn clone(&self) -> Self {
        self.inner.users.fetch_add(1, Ordering::Relaxed);
        Mm {
            grab: self.grab.clone(),
            put: AtomicBool::new(false),
        }
    }
}

impl Drop for Mm {
    fn drop(&mut self) {
        self.put_user();
    }
}

/// The mmap lock held for reading.
pub struct MmapRead<'a> {
    _guard: MmapReadGuard<'a>,
    pub(crate) mm: &'a MmInner,
}

/// The mmap lock held for writing. Its
/// [`notifier_guard`](MmapWrite::notifier_guard) registers notifiers with
/// the lock held.
pub struct MmapWrite<'a> {
    guard: MmapWriteGuard<'a>,
    pub(crate) mm: &'a MmInner,
}

impl<'a> MmapWrite<'a> {
    /// The subsystem's view of this lock, whose methods register with the
    /// lock held (`register`, `get`, `interval_insert`).
    pub fn notifier_guard(&self) -> &MmapWriteGuard<'a> {
        &self.guard
    }
}

impl std::fmt::Debug for MmapRead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmapRead(mm {})", self.mm.subs.id())
    }
}

impl std::fmt::Debug for MmapWrite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmapWrite(mm {})", self.mm.subs.id())
    }
}

impl Mm {
    /// A new, empty address space on `phys` with one user.
    pub fn new(phys: &Arc<PhysMem>) -> Mm {
        Mm {
            put: AtomicBool::new(false),
            grab: MmGrab {
                inner: Arc::new(MmInner {
                    subs: Subscriptions::new(),
                    phys: phys.clone(),
                    users: AtomicUsize::new(1),
                    exited: AtomicBool::new(false),
                    oom_reaped: AtomicBool::new(false),
                    vmas: RwLock::new(Vmas::default()),
                    ptl: Mutex::new(()),
                    pt: Mutex::new(PageTable::default()),
                    pending: Mutex::new(None),
                    migration_wq: Condvar::new(),
                    trace: Trace::default(),
                }),
            },
        }
    }

    /// A structure reference for a secondary MMU (Linux `mmgrab`).
    pub fn grab(&self) -> MmGrab {
        self.grab.clone()
    }

    /// Drops this user reference; returns true if it was the last one and
    /// the address space has exited (Linux `mmput`).
    pub fn exit(self) -> bool {
        self.put_user()
    }

    /// `mmput`, once per handle; exits the address space on the last one.
    fn put_user(&self) -> bool {
        if self.put.swap(true, Ordering::AcqRel) {
            return false;
        }
        let last = self.inner.users.fetch_sub(1, Ordering::AcqRel) == 1;
        if last {
            self.inner.exit_mmap();
        }
        last
    }

    /// Takes the mmap lock for reading.
    pub fn mmap_read(&self) -> MmapRead<'_> {
        MmapRead {
            _guard: self.inner.subs.mmap_read(),
            mm: &self.inner,
        }
    }

    /// Takes the mmap lock for writing.
    pub fn mmap_write(&self) -> MmapWrite<'_> {
        MmapWrite {
            guard: self.inner.subs.mmap_write(),
            mm: &self.inner,
        }
    }

    /// The prologue of the operations that run under the mmap read lock:
    /// validates `[addr, addr + len)`, takes the lock and traces `op`.
    pub(crate) fn read_op(&self, op: Op, addr: u64, len: u64) -> Result<(MmapRead<'_>, u64, u64)> {
        let (start, end) = check_range(addr, len)?;
        let g = self.mmap_read();
        g.mm.trace.record(op, None, start, end);
        Ok((g, start, end))
    }
}

impl MmGrab {
    /// A user reference if the address space has not exited (Linux
    /// `mmget_not_zero`).
    ///
    /// # Errors
    /// [`Error::Exited`] once the last user is gone.
    pub fn get(&self) -> Result<Mm> {
        let mut n = self.inner.users.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return Err(Error::Exited);
            }
            match self.inner.users.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Mm {
                        grab: self.clone(),
                        put: AtomicBool::new(false),
                    });
                }
                Err(cur) => n = cur,
            }
        }
    }

    /// The subscriptions of this address space: register notifiers and
    /// insert interval notifiers here.
    pub fn subscriptions(&self) -> &SubscriptionsRef {
        &self.inner.subs
    }

    /// The primary's side of the subscriptions, with the hooks: for code
    /// that acts as this address space's core mm (a test announcing an
    /// invalidation of its own). Secondaries use
    /// [`subscriptions`](Self::subscriptions).
    pub fn primary_subscriptions(&self) -> &Subscriptions {
        &self.inner.subs
    }

    /// Identity (the subscriptions' id).
    pub fn id(&self) -> u64 {
        self.inner.subs.id()
    }

    /// The physical memory this address space allocates from.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.inner.phys
    }

    /// Whether the address space has exited.
    pub fn is_exited(&self) -> bool {
        self.inner.exited.load(Ordering::Acquire)
    }

    /// Current number of user references (`mm_users`).
    pub fn users(&self) -> usize {
        self.inner.users.load(Ordering::Acquire)
    }

    /// The PTE for `vaddr`, as the hardware walker sees it now (no PTL).
    pub fn pte(&self, vaddr: u64) -> Option<Pte> {
        lock(&self.inner.pt).get(vaddr / PAGE_SIZE)
    }

    /// Every PTE, `(vaddr, pte)` in address order (for checks and tests).
    pub fn ptes(&self) -> Vec<(u64, Pte)> {
        lock(&self.inner.pt)
            .range(0, u64::MAX)
            .map(|(v, p)| (v * PAGE_SIZE, p))
            .collect()
    }

    /// The VMAs, in address order.
    pub fn vmas(&self) -> Vec<crate::vma::Vma> {
        self.inner.vmas_read().all().cloned().collect()
    }

    /// The VMA containing `addr`, if any.
    pub fn vma(&self, addr: u64) -> Option<crate::vma::Vma> {
        self.inner.vmas_read().find(addr).cloned()
    }

    /// The most recent operations and invalidations on this address space.
    pub fn recent_trace(&self) -> Vec<TraceEntry> {
        self.inner.trace.recent()
    }

    /// How many times `op` ran on this address space.
    pub fn op_count(&self, op: Op) -> u64 {
        self.inner.trace.count(op)
    }
}

/// Validates `[addr, addr + len)`: page aligned, nonempty, inside user space.
pub(crate) fn check_range(addr: u64, len: u64) -> Result<(u64, u64)> {
    let bad = Error::InvalidRange { addr, len };
    if addr % PAGE_SIZE != 0 || len == 0 || len % PAGE_SIZE != 0 {
        return Err(bad);
    }
    match addr.checked_add(len) {
        Some(end) if end <= TASK_SIZE => Ok((addr, end)),
        _ => Err(bad),
    }
}

/// An invalidation pair that also lands in the trace.
pub(crate) struct Inv<'a> {
    inner: Option<ActiveInvalidation<'a>>,
    mm: &'a MmInner,
}

impl Drop for Inv<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.inner.take() {
            let r = *a.range();
            a.end();
            self.mm
                .trace
                .record(Op::InvalidateEnd, Some(r.event()), r.start(), r.end());
        }
    }
}

impl Inv<'_> {
    /// `mmu_notifier_invalidate_range_end`.
    pub(crate) fn end(self) {}
}

impl MmInner {
    pub(crate) fn vmas_read(&self) -> RwLockReadGuard<'_, Vmas> {
        sync::read(&self.vmas)
    }

    pub(crate) fn vmas_write(&self) -> RwLockWriteGuard<'_, Vmas> {
        sync::write(&self.vmas)
    }

    /// Takes the page-table lock: what every read-modify-write of a PTE
    /// needs, as the methods of the guard it returns.
    pub(crate) fn ptl(&self) -> Ptl<'_> {
        Ptl {
            mm: self,
            _held: lock(&self.ptl),
        }
    }

    pub(crate) fn pt(&self) -> MutexGuard<'_, PageTable> {
        lock(&self.pt)
    }

    /// The PTE at `addr` read without the PTL (Linux `ptep_get_lockless`):
    /// a snapshot that may change at once, for checks a caller repeats
    /// under the PTL or for observers (the oracle, a hardware walker).
    pub(crate) fn pte_lockless(&self, addr: u64) -> Option<Pte> {
        self.pt().get(addr / PAGE_SIZE)
    }

    /// The PTEs in `[start, end)` read without the PTL, in address order:
    /// candidates for a scan (reclaim, migration, KSM, fork's copy) that
    /// re-reads each one under the PTL before it changes it.
    pub(crate) fn ptes_lockless(&self, start: u64, end: u64) -> Vec<(u64, Pte)> {
        let (s, e) = (start / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        self.pt()
            .range(s, e)
            .map(|(v, p)| (v * PAGE_SIZE, p))
            .collect()
    }

    /// The PMD entry mapping the 2 MiB block of `addr`, read without the
    /// PTL (as [`pte_lockless`](Self::pte_lockless)).
    pub(crate) fn pmd_lockless(&self, addr: u64) -> Option<Pte> {
        self.pt().pmd(addr / PMD_SIZE)
    }

    /// Start addresses of the 2 MiB blocks mapped by PMD entries that
    /// overlap `[start, end)`, read without the PTL.
    pub(crate) fn pmd_blocks_lockless(&self, start: u64, end: u64) -> Vec<u64> {
        self.pt()
            .pmd_blocks(start / PAGE_SIZE, end.div_ceil(PAGE_SIZE))
            .into_iter()
            .map(|b| b * PMD_SIZE)
            .collect()
    }

    /// `mmu_notifier_invalidate_range_start` (blockable), traced.
    pub(crate) fn invalidate(
        &self,
        event: Event,
        start: u64,
        end: u64,
        owner: Option<Owner>,
    ) -> Inv<'_> {
        self.trace
            .record(Op::InvalidateStart, Some(event), start, end);
        let range = Range::with_owner(start, end, event, owner)
            .expect("softmm builds only page-aligned, nonempty ranges");
        Inv {
            inner: Some(self.subs.invalidate_range_start(range)),
            mm: self,
        }
    }

    /// `mmu_notifier_invalidate_range_start_nonblock`, traced.
    pub(crate) fn invalidate_nonblock(
        &self,
        event: Event,
        start: u64,
        end: u64,
    ) -> std::result::Result<Inv<'_>, mmu_notifier::Again> {
        self.trace
            .record(Op::InvalidateStart, Some(event), start, end);
        let range = Range::new(start, end, event)
            .expect("softmm builds only page-aligned, nonempty ranges");
        match self.subs.invalidate_range_start_nonblock(range) {
            Ok(a) => Ok(Inv {
                inner: Some(a),
                mm: self,
            }),
            Err(e) => {
                self.trace
                    .record(Op::InvalidateEnd, Some(event), start, end);
                Err(e)
            }
        }
    }

    /// The software TLB flush every PTE change goes through; it calls the
    /// secondary-TLB hook after the (modelled) CPU flush, like x86's
    /// `flush_tlb_mm_range`.
    pub(crate) fn flush_tlb(&self, start: u64, end: u64) {
        self.trace.record(Op::TlbFlush, None, start, end);
        // Only the changes made before the callbacks run are covered: a
        // flush may run without the PTL, next to new downgrades.
        let mark = self.pt().flush_mark();
        self.subs.arch_invalidate_secondary_tlbs(start, end);
        self.pt()
            .flushed(start / PAGE_SIZE, end.div_ceil(PAGE_SIZE), mark);
    }

    /// Wakes faults waiting for migration entries.
    pub(crate) fn migration_done(&self) {
        let _ptl = self.ptl();
        self.migration_wq.notify_all();
    }

    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.exited.load(Ordering::Acquire) {
            return Err(Error::Exited);
        }
        if self.oom_reaped.load(Ordering::Acquire) {
            return Err(Error::OomReaped);
        }
        Ok(())
    }

    /// Linux `exit_mmap`: notifier release first, then the UNMAP of
    /// everything, then the frames are freed and the VMAs dropped.
    fn exit_mmap(&self) {
        self.trace.record(Op::Exit, None, 0, u64::MAX);
        // Release runs with mm_users == 0; an earlier explicit release (a
        // test driving the subsystem directly) is not an error here.
        let _ = self.subs.release();
        {
            let _mmap = self.subs.mmap_write();
            let mut gather = Gather::new(self);
            let inv = self.invalidate(Event::Unmap, 0, mmu_notifier::END_OF_ADDRESS_SPACE, None);
            // unmap_single_vma: each hugetlb VMA in a pair of its own.
            let hugetlb: Vec<crate::vma::Vma> = self
                .vmas_read()
                .all()
                .filter(|v| v.is_hugetlb())
                .cloned()
                .collect();
            for v in &hugetlb {
                self.unmap_hugepage_range(&mut gather, v, v.start, v.end);
            }
            {
                let ptl = self.ptl();
                let all: Vec<(u64, Pte)> = ptl.ptes_in(0, TASK_SIZE);
                for (addr, _) in all {
                    gather.zap(&ptl, addr);
                }
            }
            inv.end();
            gather.finish();
            self.exited.store(true, Ordering::Release);
            let vmas = self.vmas_write().clear();
            drop(vmas);
        }
        self.migration_done();
    }
}

/// The page-table lock, held (Linux's `ptl` from `pte_offset_map_lock`).
/// Every read-modify-write of PTEs is a method of it, so none can be made
/// without the lock; the page-table store it reaches is a leaf lock below
/// it. Never held across an invalidation start (callbacks may sleep).
pub(crate) struct Ptl<'a> {
    mm: &'a MmInner,
    _held: MutexGuard<'a, ()>,
}

impl<'a> Ptl<'a> {
    /// The PTE at `addr`.
    pub(crate) fn get_pte(&self, addr: u64) -> Option<Pte> {
        self.mm.pt().get(addr / PAGE_SIZE)
    }

    /// The PTE at `addr` when a page table maps it, `None` inside a PMD
    /// mapping (Linux `pte_offset_map_lock` fails on a huge PMD): what the
    /// paths that replace an entry by another kind re-check under the PTL.
    pub(crate) fn pte_offset_map(&self, addr: u64) -> Option<Pte> {
        let pt = self.mm.pt();
        match pt.pmd(addr / PMD_SIZE) {
            Some(_) => None,
            None => pt.get(addr / PAGE_SIZE),
        }
    }

    /// Writes the PTE at `addr`.
    pub(crate) fn set_pte(&self, addr: u64, pte: Pte) {
        self.mm.pt().set(addr / PAGE_SIZE, pte);
    }

    /// Clears the PTE at `addr`; returns the old one.
    pub(crate) fn clear_pte(&self, addr: u64) -> Option<Pte> {
        self.mm.pt().remove(addr / PAGE_SIZE)
    }

    /// PTEs in `[start, end)`, in address order: `(vaddr, pte)` (the pages
    /// of PMD mappings included, as the PTEs they imply).
    pub(crate) fn ptes_in(&self, start: u64, end: u64) -> Vec<(u64, Pte)> {
        self.mm.ptes_lockless(start, end)
    }

    /// The PMD entry mapping the 2 MiB block of `addr`, if a PMD maps it
    /// (Linux `pmd_trans_huge`).
    pub(crate) fn get_pmd(&self, addr: u64) -> Option<Pte> {
        self.mm.pt().pmd(addr / PMD_SIZE)
    }

    /// Maps the 2 MiB block of `addr` with the PMD entry `head`.
    pub(crate) fn set_pmd(&self, addr: u64, head: Pte) {
        self.mm.pt().set_pmd(addr / PMD_SIZE, head);
    }

    /// Clears the PMD entry of the block of `addr`; returns it.
    pub(crate) fn clear_pmd(&self, addr: u64) -> Option<Pte> {
        self.mm.pt().clear_pmd(addr / PMD_SIZE)
    }

    /// Replaces the PMD entry of the block of `addr` by the PTEs it implies
    /// (Linux `__split_huge_pmd_locked`); whether there was one.
    pub(crate) fn split_pmd(&self, addr: u64) -> bool {
        self.mm.pt().split_pmd(addr / PMD_SIZE)
    }

    /// `set_pte_at_notify`: announce `pte` to `change_pte`, then write it.
    /// After the old PTE was cleared and flushed.
    pub(crate) fn set_pte_at_notify(&self, addr: u64, pte: Pte) {
        *lock(&self.mm.pending) = Some((addr / PAGE_SIZE, pte));
        if let PteKind::Present { pfn } = pte.kind {
            self.mm.subs.change_pte(
                addr,
                mmu_notifier::PteValue {
                    pfn,
                    writable: pte.write,
                },
            );
        }
        self.mm.pt().set(addr / PAGE_SIZE, pte);
        *lock(&self.mm.pending) = None;
    }

    /// Lets go of the lock until migration entries change (or a short
    /// timeout), as a fault waiting on one does; the lock is not held after.
    pub(crate) fn wait_migration(self) {
        let (_g, _) = self
            .mm
            .migration_wq
            .wait_timeout(self._held, std::time::Duration::from_millis(10))
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Linux `struct mmu_gather`: frames whose PTEs were cleared wait here until
/// the TLB is flushed, then their mapping references are dropped (which may
/// free them). A full batch is flushed and freed at once, even inside an
/// invalidation pair.
pub(crate) struct Gather<'a> {
    mm: &'a MmInner,
    /// Batch entries: a first frame and how many frames follow it (a
    /// compound page is one entry, as Linux's `tlb_remove_page_size`).
    frames: Vec<(u64, u64)>,
    lo: u64,
    hi: u64,
}

impl<'a> Gather<'a> {
    pub(crate) fn new(mm: &'a MmInner) -> Self {
        Gather {
            mm,
            frames: Vec::new(),
            lo: u64::MAX,
            hi: 0,
        }
    }

    /// Clears the entry at `addr` (under `ptl`) and queues what it
    /// referenced; inside a PMD mapping the whole PMD goes (Linux
    /// `zap_huge_pmd`: callers split blocks the range only partly covers
    /// first). Returns the old PTE.
    pub(crate) fn zap(&mut self, ptl: &Ptl<'_>, addr: u64) -> Option<Pte> {
        if ptl.get_pmd(addr).is_some() {
            let old = ptl.get_pte(addr);
            self.zap_pmd(ptl, addr);
            return old;
        }
        let old = ptl.clear_pte(addr)?;
        self.lo = self.lo.min(addr);
        self.hi = self.hi.max(addr + PAGE_SIZE);
        match old.kind {
            PteKind::Swap { slot } => self.mm.phys.swap_free(slot),
            _ => {
                if let Some(pfn) = old.maps_frame() {
                    self.queue(pfn, 1);
                }
            }
        }
        Some(old)
    }

    /// Linux `zap_huge_pmd`: clears the PMD entry of the block of `addr`
    /// and queues its compound page as one batch entry.
    fn zap_pmd(&mut self, ptl: &Ptl<'_>, addr: u64) {
        let block = addr & !(PMD_SIZE - 1);
        let Some(head) = ptl.clear_pmd(block) else {
            return;
        };
        self.lo = self.lo.min(block);
        self.hi = self.hi.max(block + PMD_SIZE);
        if let Some(pfn) = head.maps_frame() {
            self.queue(pfn, HPAGE_PMD_NR);
        }
    }

    fn queue(&mut self, pfn: u64, nr: u64) {
        self.frames.push((pfn, nr));
        if self.frames.len() >= GATHER_BATCH {
            self.flush();
        }
    }

    /// `tlb_flush_mmu`: flush what was gathered, then drop the references.
    fn flush(&mut self) {
        if self.lo < self.hi {
            self.mm.flush_tlb(self.lo, self.hi);
            self.lo = u64::MAX;
            self.hi = 0;
        }
        for (first, nr) in self.frames.drain(..) {
            for pfn in first..first + nr {
                self.mm.phys.unmap(pfn);
            }
        }
    }

    /// `tlb_finish_mmu`.
    pub(crate) fn finish(mut self) {
        self.flush();
    }
}

impl Drop for Gather<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
