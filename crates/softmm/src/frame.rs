//! Physical memory: a fixed pool of 4 KiB frames with contents, reference
//! counts and a generation number, plus the swap store.
//!
//! A frame's generation is bumped every time it is freed, and freed frames
//! are handed out again last-in first-out, so a secondary that keeps a
//! translation past the free is caught twice over: the frame is soon someone
//! else's, and its [`FrameRef`] no longer matches.
//!
//! Counting follows Linux's `struct page`: `refs` counts every reference
//! (mappings, pins, a shared object's page cache, transient users), `maps`
//! counts page-table entries, `pins` counts `pin` (FOLL_PIN) users. A frame is
//! freed when `refs` drops to zero, never earlier.

use mmu_notifier::sync::{lock, AtomicU64, Mutex, MutexGuard, Ordering};

use mmu_notifier::Owner;

use crate::error::{Error, Result};
pub use crate::pfn::HPAGE_PMD_NR;
use crate::pfn::{FrameRef, ZERO_PFN};
use crate::verdict::Oracle;
use crate::PAGE_SIZE;

/// What kind of memory a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Ordinary system memory.
    System,
    /// Device-private memory of the device with this pgmap owner.
    DevicePrivate(Owner),
}

/// The driver side of device-private memory (Linux `dev_pagemap_ops`).
pub trait DevicePagemap: Send + Sync + 'static {
    /// Device page `frame`, mapped at `addr` of address space `mm_id`, is
    /// being migrated back to system memory (a CPU fault or an explicit
    /// migration; the MIGRATE invalidation carries this device as owner, so
    /// the driver ignores it and must drop its own entry here, as
    /// `dmirror_devmem_fault_alloc_and_copy` does). Called without the PTL.
    fn migrating_to_ram(&self, mm_id: u64, addr: u64, frame: FrameRef);
}

struct Meta {
    allocated: bool,
    kind: FrameKind,
    /// `None` reads as zeros; allocated on first write.
    data: Option<Box<[u8]>>,
    refs: u32,
    maps: u32,
    pins: u32,
    /// A KSM page: shared read-only, every write fault copies.
    ksm: bool,
    /// MADV_FREE'd and still clean: reclaim may discard it.
    lazyfree: bool,
}

struct Frame {
    gen: AtomicU64,
    meta: Mutex<Meta>,
}

/// Counters of the frame allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames in the pool (including the zero page).
    pub capacity: u64,
    /// Frames allocated now (including the zero page).
    pub in_use: u64,
    /// Allocations so far.
    pub allocs: u64,
    /// Frees so far.
    pub frees: u64,
    /// Reference-count underflows seen (a double free; always a bug).
    pub underflows: u64,
    /// Swap slots in use.
    pub swap_slots: u64,
    /// Transparent huge pages allocated so far (each also counts
    /// [`HPAGE_PMD_NR`] frames in `allocs`).
    pub huge_allocs: u64,
}

struct SwapSlot {
    count: u32,
    data: Option<Box<[u8]>>,
}

/// The physical memory every address space of one machine allocates from.
///
/// ```
/// use softmm::PhysMem;
/// let phys = PhysMem::new(16);
/// let f = phys.alloc_frame().unwrap();
/// phys.write_frame(f, 0, b"hi").unwrap();
/// let mut b = [0u8; 2];
/// phys.read_frame(f, 0, &mut b).unwrap();
/// assert_eq!(&b, b"hi");
/// phys.put_frame(f.pfn);
/// assert!(phys.read_frame(f, 0, &mut b).is_err()); // freed: the handle is stale
/// ```
pub struct PhysMem {
    frames: Box<[Frame]>,
    free: Mutex<Vec<u64>>,
    allocs: AtomicU64,
    huge_allocs: AtomicU64,
    frees: AtomicU64,
    underflows: AtomicU64,
    swap: Mutex<SwapStore>,
    /// The drivers of each owner's device memory: one per open of the
    /// device (dmirror's file descriptors share its pagemap), each told
    /// of every page of that owner migrating back to RAM.
    pagemaps: Mutex<std::collections::HashMap<Owner, Vec<std::sync::Arc<dyn DevicePagemap>>>>,
    pub(crate) oracle: Oracle,
}

#[derive(Default)]
struct SwapStore {
    slots: std::collections::HashMap<u64, SwapSlot>,
    next: u64,
}

impl std::fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysMem")
            .field("stats", &self.stats())
            .finish()
    }
}

impl PhysMem {
    /// A machine with `frames` frames of 4 KiB (one of them is the zero
    /// page). Shared by every [`Mm`](crate::Mm) created on it.
    pub fn new(frames: usize) -> std::sync::Arc<PhysMem> {
        let frames = frames.max(2);
        let pool: Box<[Frame]> = (0..frames)
            .map(|i| Frame {
                gen: AtomicU64::new(0),
                meta: Mutex::new(Meta {
                    allocated: i as u64 == ZERO_PFN,
                    kind: FrameKind::System,
                    data: None,
                    refs: u32::from(i as u64 == ZERO_PFN),
                    maps: 0,
                    pins: 0,
                    ksm: false,
                    lazyfree: false,
                }),
            })
            .collect();
        // Popped from the end: low frame numbers first, then LIFO reuse.
        let free = (1..frames as u64).rev().collect();
        std::sync::Arc::new(PhysMem {
            frames: pool,
            free: Mutex::new(free),
            allocs: AtomicU64::new(0),
            huge_allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            underflows: AtomicU64::new(0),
            swap: Mutex::new(SwapStore::default()),
            pagemaps: Mutex::new(std::collections::HashMap::new()),
            oracle: Oracle::default(),
        })
    }

    /// Registers a driver of device memory with pgmap owner `owner` (Linux
    /// `memremap_pages` with a `dev_pagemap_ops`). Several may be
    /// registered for one owner (several opens of one device): each is told
    /// of every page of the owner migrating back to RAM and keeps to its
    /// own, and each stays registered until it is itself unregistered.
    pub fn register_pagemap(&self, owner: Owner, ops: std::sync::Arc<dyn DevicePagemap>) {
        lock(&self.pagemaps).entry(owner).or_default().push(ops);
    }

    /// Removes `ops` (one registration made with `owner`); the owner's
    /// other registrations stay. Removing one not registered does nothing.
    pub fn unregister_pagemap(&self, owner: Owner, ops: &std::sync::Arc<dyn DevicePagemap>) {
        let mut maps = lock(&self.pagemaps);
        if let Some(list) = maps.get_mut(&owner) {
            if let Some(i) = list.iter().position(|o| std::sync::Arc::ptr_eq(o, ops)) {
                list.remove(i);
            }
            if list.is_empty() {
                maps.remove(&owner);
            }
        }
    }

    /// Every driver registered for `owner`.
    pub(crate) fn pagemaps(&self, owner: Owner) -> Vec<std::sync::Arc<dyn DevicePagemap>> {
        lock(&self.pagemaps)
            .get(&owner)
            .cloned()
            .unwrap_or_default()
    }

    /// The coherence oracle of this machine.
    pub fn oracle(&self) -> &Oracle {
        &self.oracle
    }

    fn frame(&self, pfn: u64) -> Option<&Frame> {
        self.frames.get(usize::try_from(pfn).ok()?)
    }

    fn meta(&self, pfn: u64) -> Option<MutexGuard<'_, Meta>> {
        self.frame(pfn).map(|f| lock(&f.meta))
    }

    /// Allocates a zeroed system frame with one reference.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when every frame is in use.
    pub fn alloc_frame(&self) -> Result<FrameRef> {
        self.alloc(FrameKind::System)
    }

    /// Allocates a zeroed frame of `kind` with one reference.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when every frame is in use.
    pub fn alloc(&self, kind: FrameKind) -> Result<FrameRef> {
        let pfn = lock(&self.free).pop().ok_or(Error::OutOfMemory)?;
        Ok(self.take_free(pfn, kind))
    }

    /// Allocates a transparent huge page: [`HPAGE_PMD_NR`] zeroed system
    /// frames, contiguous and aligned to their number (as a PMD maps them),
    /// each with one reference. Returns the head frame. Like Linux's THP
    /// allocation it fails rather than waits when no such run is free (the
    /// fault then falls back to base pages).
    ///
    /// The frames are counted one by one afterwards (Linux counts the folio
    /// as a whole): a THP that is split and partly unmapped frees its
    /// unmapped frames at once, where Linux keeps them until the deferred
    /// split. A secondary still using such a frame is caught all the same.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when no aligned run of free frames exists.
    pub fn alloc_huge(&self) -> Result<FrameRef> {
        let head = {
            let mut free = lock(&self.free);
            let set: std::collections::HashSet<u64> = free.iter().copied().collect();
            let blocks = self.frames.len() as u64 / HPAGE_PMD_NR;
            // Block 0 holds the zero page.
            let head = (1..blocks)
                .map(|b| b * HPAGE_PMD_NR)
                .find(|&h| (h..h + HPAGE_PMD_NR).all(|p| set.contains(&p)))
                .ok_or(Error::OutOfMemory)?;
            free.retain(|&p| !(head..head + HPAGE_PMD_NR).contains(&p));
            head
        };
        self.huge_allocs.fetch_add(1, Ordering::Relaxed);
        let first = self.take_free(head, FrameKind::System);
        for pfn in head + 1..head + HPAGE_PMD_NR {
            self.take_free(pfn, FrameKind::System);
        }
        Ok(first)
    }

    /// The PMD entry mapping the huge page at `head`, just allocated, takes
    /// over the allocation's reference on each of its frames.
    pub(crate) fn map_new_huge(&self, head: u64) {
        for pfn in head..head + HPAGE_PMD_NR {
            self.map(pfn);
            self.put_frame(pfn);
        }
    }

    /// Copies the huge page at `src` into the one at `dst` (COW, a pinned
    /// page copied at fork).
    pub(crate) fn copy_huge(&self, src: u64, dst: u64) {
        for i in 0..HPAGE_PMD_NR {
            self.copy_frame(src + i, dst + i);
        }
    }

    /// Whether one mapping is all that holds the huge page at `head` (each
    /// frame mapped once, no other reference): a write may reuse it.
    pub(crate) fn huge_exclusive(&self, head: u64) -> bool {
        (head..head + HPAGE_PMD_NR).all(|p| self.refcount(p) == 1 && self.mapcount(p) == 1)
    }

    /// Whether a frame of the huge page at `head` is pinned.
    pub(crate) fn huge_pinned(&self, head: u64) -> bool {
        (head..head + HPAGE_PMD_NR).any(|p| self.pincount(p) > 0)
    }

    /// Marks `pfn`, just taken off the free list, allocated as `kind` with
    /// one reference.
    fn take_free(&self, pfn: u64, kind: FrameKind) -> FrameRef {
        let f = &self.frames[pfn as usize];
        let mut m = lock(&f.meta);
        debug_assert!(!m.allocated);
        m.allocated = true;
        m.kind = kind;
        m.refs = 1;
        m.maps = 0;
        m.pins = 0;
        m.ksm = false;
        m.lazyfree = false;
        self.allocs.fetch_add(1, Ordering::Relaxed);
        FrameRef {
            pfn,
            gen: f.gen.load(Ordering::Acquire),
        }
    }

    /// The current handle of frame `pfn` (its present generation).
    pub fn frame_ref(&self, pfn: u64) -> FrameRef {
        FrameRef {
            pfn,
            gen: self.generation(pfn),
        }
    }

    /// Current generation of `pfn` (bumped at every free).
    pub fn generation(&self, pfn: u64) -> u64 {
        self.frame(pfn)
            .map_or(u64::MAX, |f| f.gen.load(Ordering::Acquire))
    }

    /// Whether `f` still names a live frame of the same generation.
    pub fn is_current(&self, f: FrameRef) -> bool {
        self.frame(f.pfn)
            .is_some_and(|fr| fr.gen.load(Ordering::Acquire) == f.gen && lock(&fr.meta).allocated)
    }

    /// Takes one more reference on `pfn` (Linux `get_page`).
    pub(crate) fn get(&self, pfn: u64) {
        self.update(pfn, |m| m.refs += 1);
    }

    fn update(&self, pfn: u64, f: impl FnOnce(&mut Meta)) {
        if let Some(mut m) = self.meta(pfn) {
            f(&mut m);
        }
    }

    /// Drops one reference on frame `pfn` (Linux `put_page`); the frame is
    /// freed, its contents zeroed and its generation bumped when the last
    /// reference goes. A put below zero is counted in
    /// [`FrameStats::underflows`] instead of corrupting the pool.
    pub fn put_frame(&self, pfn: u64) {
        let Some(f) = self.frame(pfn) else { return };
        let mut m = lock(&f.meta);
        if !m.allocated || m.refs == 0 || pfn == ZERO_PFN && m.refs == 1 {
            self.underflows.fetch_add(1, Ordering::Relaxed);
            return;
        }
        m.refs -= 1;
        if m.refs == 0 {
            m.allocated = false;
            m.data = None;
            f.gen.fetch_add(1, Ordering::AcqRel);
            drop(m);
            self.frees.fetch_add(1, Ordering::Relaxed);
            lock(&self.free).push(pfn);
        }
    }

    /// One more PTE maps `pfn` (takes a reference too).
    pub(crate) fn map(&self, pfn: u64) {
        self.update(pfn, |m| {
            m.refs += 1;
            m.maps += 1;
        });
    }

    /// One PTE fewer maps `pfn`; drops the mapping's reference, which may
    /// free the frame.
    pub(crate) fn unmap(&self, pfn: u64) {
        self.update(pfn, |m| m.maps = m.maps.saturating_sub(1));
        self.put_frame(pfn);
    }

    /// Number of PTEs mapping `pfn`.
    pub fn mapcount(&self, pfn: u64) -> u32 {
        self.meta(pfn).map_or(0, |m| m.maps)
    }

    /// Number of references on `pfn`.
    pub fn refcount(&self, pfn: u64) -> u32 {
        self.meta(pfn).map_or(0, |m| m.refs)
    }

    /// Number of pins on `pfn`.
    pub fn pincount(&self, pfn: u64) -> u32 {
        self.meta(pfn).map_or(0, |m| m.pins)
    }

    pub(crate) fn pin(&self, pfn: u64) {
        self.update(pfn, |m| {
            m.refs += 1;
            m.pins += 1;
        });
    }

    pub(crate) fn unpin(&self, pfn: u64) {
        self.update(pfn, |m| m.pins = m.pins.saturating_sub(1));
        self.put_frame(pfn);
    }

    /// Kind of memory of `pfn`.
    pub fn kind(&self, pfn: u64) -> FrameKind {
        self.meta(pfn).map_or(FrameKind::System, |m| m.kind)
    }

    /// Whether `pfn` is system memory (not device-private).
    pub(crate) fn is_system(&self, pfn: u64) -> bool {
        self.kind(pfn) == FrameKind::System
    }

    pub(crate) fn is_ksm(&self, pfn: u64) -> bool {
        self.meta(pfn).is_some_and(|m| m.ksm)
    }

    pub(crate) fn set_ksm(&self, pfn: u64) {
        self.update(pfn, |m| m.ksm = true);
    }

    pub(crate) fn set_lazyfree(&self, pfn: u64) {
        self.update(pfn, |m| m.lazyfree = true);
    }

    pub(crate) fn is_lazyfree(&self, pfn: u64) -> bool {
        self.meta(pfn).is_some_and(|m| m.lazyfree)
    }

    fn checked(&self, f: FrameRef) -> Result<MutexGuard<'_, Meta>> {
        let stale = Error::StaleFrame {
            pfn: f.pfn,
            gen: f.gen,
        };
        let frame = self.frame(f.pfn).ok_or(stale.clone())?;
        let m = lock(&frame.meta);
        if !m.allocated || frame.gen.load(Ordering::Acquire) != f.gen {
            return Err(stale);
        }
        Ok(m)
    }

    /// Copies from frame `f` at `offset` into `buf` (a device's or the
    /// CPU's load through a translation).
    ///
    /// # Errors
    /// [`Error::StaleFrame`] if `f` was freed; [`Error::InvalidRange`] if
    /// the copy leaves the page.
    pub fn read_frame(&self, f: FrameRef, offset: usize, buf: &mut [u8]) -> Result<()> {
        check_span(offset, buf.len())?;
        let m = self.checked(f)?;
        match &m.data {
            Some(d) => buf.copy_from_slice(&d[offset..offset + buf.len()]),
            None => buf.fill(0),
        }
        Ok(())
    }

    /// Copies `data` into frame `f` at `offset`.
    ///
    /// # Errors
    /// As [`read_frame`](Self::read_frame); writing the zero page is an
    /// [`Error::InvalidRange`].
    pub fn write_frame(&self, f: FrameRef, offset: usize, data: &[u8]) -> Result<()> {
        check_span(offset, data.len())?;
        if f.pfn == ZERO_PFN {
            return Err(Error::InvalidRange {
                addr: 0,
                len: data.len() as u64,
            });
        }
        let mut m = self.checked(f)?;
        m.data
            .get_or_insert_with(|| vec![0; PAGE_SIZE as usize].into_boxed_slice())
            [offset..offset + data.len()]
            .copy_from_slice(data);
        m.lazyfree = false;
        Ok(())
    }

    /// The whole page content of `pfn` (`None` means all zeros).
    pub(crate) fn content(&self, pfn: u64) -> Option<Box<[u8]>> {
        self.meta(pfn).and_then(|m| m.data.clone())
    }

    pub(crate) fn set_content(&self, pfn: u64, data: Option<Box<[u8]>>) {
        self.update(pfn, |m| m.data = data);
    }

    /// Copies the content of `src` into `dst` (COW, migration).
    pub(crate) fn copy_frame(&self, src: u64, dst: u64) {
        let data = self.content(src);
        self.set_content(dst, data);
    }

    /// Whether two frames hold the same bytes (KSM's `pages_identical`).
    pub(crate) fn same_content(&self, a: u64, b: u64) -> bool {
        let (x, y) = (self.content(a), self.content(b));
        let zero = |d: &Option<Box<[u8]>>| d.as_ref().map_or(true, |d| d.iter().all(|&b| b == 0));
        match (&x, &y) {
            (Some(x), Some(y)) => x == y,
            _ => zero(&x) && zero(&y),
        }
    }

    // ------------------------------------------------------------------
    // Swap
    // ------------------------------------------------------------------

    /// Moves `data` to a new swap slot with one reference.
    pub(crate) fn swap_out(&self, data: Option<Box<[u8]>>) -> u64 {
        let mut s = lock(&self.swap);
        s.next += 1;
        let slot = s.next;
        s.slots.insert(slot, SwapSlot { count: 1, data });
        slot
    }

    pub(crate) fn swap_dup(&self, slot: u64) {
        if let Some(s) = lock(&self.swap).slots.get_mut(&slot) {
            s.count += 1;
        }
    }

    /// Reads a slot's content and drops one reference to it.
    pub(crate) fn swap_take(&self, slot: u64) -> Option<Box<[u8]>> {
        let mut s = lock(&self.swap);
        let e = s.slots.get_mut(&slot)?;
        e.count -= 1;
        if e.count == 0 {
            s.slots.remove(&slot).and_then(|e| e.data)
        } else {
            e.data.clone()
        }
    }

    pub(crate) fn swap_free(&self, slot: u64) {
        let _ = self.swap_take(slot);
    }

    /// Allocator counters.
    pub fn stats(&self) -> FrameStats {
        let free = lock(&self.free).len() as u64;
        FrameStats {
            capacity: self.frames.len() as u64,
            in_use: self.frames.len() as u64 - free,
            allocs: self.allocs.load(Ordering::Relaxed),
            frees: self.frees.load(Ordering::Relaxed),
            underflows: self.underflows.load(Ordering::Relaxed),
            swap_slots: lock(&self.swap).slots.len() as u64,
            huge_allocs: self.huge_allocs.load(Ordering::Relaxed),
        }
    }

    /// Frames with a nonzero mapcount or pincount, for accounting checks:
    /// `(pfn, maps, pins, refs)`.
    pub fn frame_counts(&self) -> Vec<(u64, u32, u32, u32)> {
        self.frames
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let m = lock(&f.meta);
                (m.allocated && i as u64 != ZERO_PFN).then_some((i as u64, m.maps, m.pins, m.refs))
            })
            .collect()
    }
}

fn check_span(offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(e) if e <= PAGE_SIZE as usize => Ok(()),
        _ => Err(Error::InvalidRange {
            addr: offset as u64,
            len: len as u64,
        }),
    }
}
