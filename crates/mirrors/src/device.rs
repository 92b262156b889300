//! `DeviceMirror`: the HMM pattern of Linux's `lib/test_hmm.c` (dmirror). A device page table under the device lock, an
//! interval notifier over the whole address space, the
//! `read_begin` / `range_fault` / `read_retry` loop, and the dmirror
//! commands: read, write, migrate to and from device memory, snapshot,
//! exclusive access, release, flags (`FAIL_ALLOC`).
//!
//! One deliberate difference from dmirror: for MIGRATE events of its own
//! migration to device memory, dmirror returns at once. Here the callback
//! still bumps the sequence and drops entries of *system* pages (it keeps
//! only its own device pages, which that migration does not move), because
//! dmirror's early return lets a concurrent fault of the same device install
//! a system page that its own migration is about to free. A MIGRATE with
//! this device as owner that moves its pages back to RAM (a CPU fault, or
//! `migrate_to_system`) drops everything in the range. Both races are
//! harmless in the single-threaded selftests and coherence violations under
//! `mmun stress`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, Weak};

use mmu_notifier::sync::{AtomicU64, MutexGuard, Ordering};

use mmu_notifier::{DriverLock, Event, IntervalNotifier, IntervalOps, Owner, Range};
use softmm::{
    DevicePagemap, Error as MmError, FrameKind, FrameRef, HmmRange, MmGrab, PteKind, PAGE_SIZE,
    TASK_SIZE,
};

/// dmirror processes ranges in chunks of this many pages.
pub const CHUNK_PAGES: u64 = 64;

/// Fault rounds of one read or write before giving up with `EBUSY`.
const MAX_ROUNDS: u64 = 1000;

/// Deadline of the populate loop, in retries (Linux: 1000 ms).
const MAX_COLLISIONS: u32 = 10_000;

/// Tag of a device page-table entry (dmirror's xarray tags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Read-only mapping.
    Read,
    /// Writable mapping (`DPT_XA_TAG_WRITE`).
    Write,
    /// Exclusive (atomic) access (`DPT_XA_TAG_ATOMIC`).
    Atomic,
}

/// The errno-style results of the dmirror commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmirrorError {
    /// `-EINVAL`.
    #[error("EINVAL")]
    Inval,
    /// `-EFAULT`.
    #[error("EFAULT")]
    Fault,
    /// `-EPERM`.
    #[error("EPERM")]
    Perm,
    /// `-ENOENT`.
    #[error("ENOENT")]
    NoEnt,
    /// `-EBUSY`.
    #[error("EBUSY")]
    Busy,
    /// `-ENOMEM`.
    #[error("ENOMEM")]
    NoMem,
    /// The oracle caught a stale device mapping (never expected).
    #[error("coherence violation")]
    Violation,
}

impl From<MmError> for DmirrorError {
    fn from(e: MmError) -> Self {
        match e {
            MmError::InvalidRange { .. } => DmirrorError::Inval,
            MmError::Protection {
                access: "write", ..
            } => DmirrorError::Perm,
            MmError::OutOfMemory => DmirrorError::NoMem,
            MmError::Busy => DmirrorError::Busy,
            _ => DmirrorError::Fault,
        }
    }
}

/// Outputs of a command (`struct hmm_dmirror_cmd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cmd {
    /// Pages processed (`cpages`).
    pub cpages: u64,
    /// Fault rounds (`faults`).
    pub faults: u64,
}

/// Snapshot byte encoding (`HMM_DMIRROR_PROT_*`).
pub mod prot {
    /// `HMM_PFN_ERROR`.
    pub const ERROR: u8 = 0xFF;
    /// Not present.
    pub const NONE: u8 = 0x00;
    /// Readable.
    pub const READ: u8 = 0x01;
    /// Writable.
    pub const WRITE: u8 = 0x02;
    /// Mapped by a PMD entry in the primary (a 2 MiB huge page).
    pub const PMD: u8 = 0x04;
    /// Mapped by a PUD entry in the primary (a 1 GiB huge page; softmm
    /// has none, so it is never set).
    pub const PUD: u8 = 0x08;
    /// The zero page.
    pub const ZERO: u8 = 0x10;
    /// Device-private memory of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private memory of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
}

/// dmirror's FLAGS command (`HMM_DMIRROR_FLAGS`): bits of
/// [`DeviceMirror::set_flags`].
pub mod flags {
    /// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the next device page this mirror
    /// allocates fails (once), so that page stays in system memory.
    pub const FAIL_ALLOC: u64 = 1;
}

#[derive(Debug, Default)]
struct Counters {
    invalidations: AtomicU64,
    faults: AtomicU64,
    retries: AtomicU64,
    accesses: AtomicU64,
}

struct MirrorState {
    mm: MmGrab,
    owner: Owner,
    /// The device page table (`dmirror->pt`) under the user lock
    /// (`dmirror->mutex`).
    pt: DriverLock<BTreeMap<u64, (FrameRef, Tag)>>,
    sub: OnceLock<IntervalNotifier>,
    /// This mirror's registration as a driver of its owner's memory.
    pagemap: OnceLock<Arc<dyn DevicePagemap>>,
    /// dmirror's `flags` ([`flags`]).
    flags: AtomicU64,
    counters: Counters,
}

/// An HMM-style device mirroring one address space.
pub struct DeviceMirror {
    inner: Arc<MirrorState>,
}

impl std::fmt::Debug for DeviceMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMirror")
            .field("owner", &self.inner.owner)
            .finish()
    }
}

struct MirrorNotifier(Weak<MirrorState>);

mmu_notifier::sync::thread_local! {
    /// Set while this thread runs a device's own migration to device memory.
    static MIGRATING_TO_DEVICE: std::cell::Cell<Option<Owner>> = const { std::cell::Cell::new(None) };
}

impl IntervalOps for MirrorNotifier {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
        let Some(dev) = self.0.upgrade() else {
            return true;
        };
        // This device's own migration to device memory (running on this
        // thread): its existing device pages are not being moved.
        let own_migration = r.event() == Event::Migrate
            && r.owner() == Some(dev.owner)
            && MIGRATING_TO_DEVICE.with(|m| m.get()) == Some(dev.owner);
        dev.pt
            .invalidate(sub, r, seq, |pt| {
                dev.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                let keys: Vec<u64> = pt.range(r.start()..r.end()).map(|(&k, _)| k).collect();
                let phys = dev.mm.phys();
                for k in keys {
                    let mine = phys.kind(pt[&k].0.pfn) == FrameKind::DevicePrivate(dev.owner);
                    if !(own_migration && mine) {
                        pt.remove(&k);
                    }
                }
            })
            .is_some()
    }
}

struct Pagemap(Weak<MirrorState>);

impl DevicePagemap for Pagemap {
    fn migrating_to_ram(&self, mm_id: u64, addr: u64, _frame: FrameRef) {
        if let Some(dev) = self.0.upgrade() {
            if dev.mm.id() == mm_id {
                dev.lock().remove(&addr);
            }
        }
    }
}

/// Commands that copy data allocate a buffer of the whole range; larger
/// ones are refused with `ENOMEM` (dmirror's bounce buffer would fail too).
pub const MAX_CMD_PAGES: u64 = 1 << 18;

/// dmirror's chunking of a migration: from `a`, at most [`CHUNK_PAGES`]
/// and not past `end` or `a`'s VMA, which must exist and be readable
/// (`-EINVAL` otherwise). Returns where the chunk ends.
fn migration_chunk_end(mm: &softmm::Mm, a: u64, end: u64) -> Result<u64, DmirrorError> {
    let vma = mm
        .vma(a)
        .filter(|v| v.prot.read)
        .ok_or(DmirrorError::Inval)?;
    Ok((a + CHUNK_PAGES * PAGE_SIZE).min(end).min(vma.end))
}

fn check_buf(addr: u64, npages: u64) -> Result<(u64, u64), DmirrorError> {
    if npages > MAX_CMD_PAGES {
        return Err(DmirrorError::NoMem);
    }
    check(addr, npages)
}

fn check(addr: u64, npages: u64) -> Result<(u64, u64), DmirrorError> {
    let len = npages.checked_mul(PAGE_SIZE).ok_or(DmirrorError::Inval)?;
    match addr.checked_add(len) {
        Some(end) if addr % PAGE_SIZE == 0 && end > addr && end <= TASK_SIZE => Ok((addr, end)),
        _ => Err(DmirrorError::Inval),
    }
}

impl MirrorState {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (FrameRef, Tag)>> {
        self.pt.lock()
    }

    fn sub(&self) -> &IntervalNotifier {
        self.sub.get().expect("set at open")
    }

    /// The HMM populate loop for `[start, end)` (one chunk).
    fn range_fault(&self, start: u64, end: u64, write: bool) -> Result<(), DmirrorError> {
        let Ok(mm) = self.mm.get() else {
            return Ok(()); // mmget_not_zero failed: dmirror returns 0
        };
        let sub = self.sub();
        for _ in 0..MAX_COLLISIONS {
            let seq = sub.read_begin().map_err(|_| DmirrorError::Fault)?;
            let mut range = HmmRange::new(sub, seq, start, end);
            range.fault = true;
            range.write = write;
            range.dev_private_owner = Some(self.owner);
            let r = {
                let g = mm.mmap_read();
                g.range_fault(&mut range)
            };
            match r {
                Err(MmError::Busy) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(e.into()),
                Ok(()) => {}
            }
            let installed = self.pt.commit(sub, seq, |pt| {
                for (i, p) in range.pfns.iter().enumerate() {
                    if let (true, Some(f)) = (p.valid, p.frame) {
                        if write && !p.write {
                            // dmirror_do_fault: a write fault answered with a
                            // read-only page (this device's own memory, which
                            // range_fault reports without faulting it, as
                            // hmm_range_fault does) is -EFAULT.
                            return Err(DmirrorError::Fault);
                        }
                        let tag = if p.write { Tag::Write } else { Tag::Read };
                        pt.insert(start + i as u64 * PAGE_SIZE, (f, tag));
                    }
                }
                Ok(())
            });
            if let Some(done) = installed {
                return done;
            }
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        Err(DmirrorError::Busy)
    }

    /// Installs entries for pages a primary operation gave the device
    /// (migration, exclusive access) with the interval protocol: each page
    /// is installed only if the primary still maps that frame there, and
    /// nothing if an invalidation hit the range meanwhile (then the loop
    /// takes a new sequence and re-checks).
    fn install(&self, pages: &[(u64, FrameRef, Tag)], expect: impl Fn(&PteKind, u64) -> bool) {
        let sub = self.sub();
        loop {
            let Ok(seq) = sub.read_begin() else { return };
            let installed = self.pt.commit(sub, seq, |pt| {
                for &(addr, f, tag) in pages {
                    let Some(pte) = self.mm.pte(addr) else {
                        continue;
                    };
                    if !expect(&pte.kind, f.pfn) || !self.mm.phys().is_current(f) {
                        continue;
                    }
                    // The PTE may have lost write permission since (fork, mprotect).
                    let tag = if tag == Tag::Write && !pte.write {
                        Tag::Read
                    } else {
                        tag
                    };
                    pt.insert(addr, (f, tag));
                }
            });
            if installed.is_some() {
                return;
            }
        }
    }

    /// Copies present entries from `start` into `out`, checking each access
    /// with the oracle; returns the first address without a (suitable)
    /// entry.
    fn copy_out(
        &self,
        start: u64,
        end: u64,
        out: &mut [u8],
        base: u64,
    ) -> Result<u64, DmirrorError> {
        let pt = self.lock();
        let mut a = start;
        while a < end {
            let Some(&(f, _)) = pt.get(&a) else { break };
            self.counters.accesses.fetch_add(1, Ordering::Relaxed);
            self.checked(a, f, false)?;
            let off = (a - base) as usize;
            self.mm
                .phys()
                .read_frame(f, 0, &mut out[off..off + PAGE_SIZE as usize])
                .map_err(|_| DmirrorError::Violation)?;
            a += PAGE_SIZE;
        }
        Ok(a)
    }

    fn checked(&self, addr: u64, f: FrameRef, write: bool) -> Result<(), DmirrorError> {
        self.mm
            .phys()
            .oracle()
            .check_access(&self.mm, addr, f, write)
            .map_err(|_| DmirrorError::Violation)
    }
}

impl DeviceMirror {
    /// Opens a device mirror of `mm` with device-memory owner `owner`
    /// (dmirror `open()`: interval notifier over the whole address space,
    /// plus the device's pagemap for CPU faults on its memory).
    ///
    /// # Errors
    /// The subsystem's insert errors (an exited address space).
    pub fn open(mm: MmGrab, owner: Owner) -> Result<DeviceMirror, mmu_notifier::Error> {
        let inner = Arc::new(MirrorState {
            mm,
            owner,
            pt: DriverLock::new(BTreeMap::new()),
            sub: OnceLock::new(),
            pagemap: OnceLock::new(),
            flags: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let sub = inner.mm.subscriptions().interval_insert(
            0,
            !(PAGE_SIZE - 1), // dmirror: ULONG_MAX & PAGE_MASK
            Arc::new(MirrorNotifier(Arc::downgrade(&inner))),
        )?;
        let _ = inner.sub.set(sub);
        let pagemap: Arc<dyn DevicePagemap> = Arc::new(Pagemap(Arc::downgrade(&inner)));
        inner.mm.phys().register_pagemap(owner, pagemap.clone());
        let _ = inner.pagemap.set(pagemap);
        Ok(DeviceMirror { inner })
    }

    /// The device's pgmap owner.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// Entries in the device page table now.
    pub fn entries(&self) -> usize {
        self.inner.lock().len()
    }

    /// (invalidations, faults, retries, oracle-checked accesses).
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        let c = &self.inner.counters;
        (
            c.invalidations.load(Ordering::Relaxed),
            c.faults.load(Ordering::Relaxed),
            c.retries.load(Ordering::Relaxed),
            c.accesses.load(Ordering::Relaxed),
        )
    }

    /// dmirror READ: copies `npages` from `addr` through the device page
    /// table, faulting missing pages (one fault round faults the rest).
    ///
    /// # Errors
    /// `Inval` for bad ranges, `Fault` for unmapped or unreadable memory.
    pub fn read(&self, addr: u64, npages: u64) -> Result<(Vec<u8>, Cmd), DmirrorError> {
        let (start, end) = check_buf(addr, npages)?;
        let mut out = vec![0u8; (end - start) as usize];
        let mut cmd = Cmd::default();
        let mut at = start;
        loop {
            at = self.inner.copy_out(at, end, &mut out, start)?;
            if at >= end {
                break;
            }
            if cmd.faults >= MAX_ROUNDS {
                return Err(DmirrorError::Busy);
            }
            self.fault_rest(at, end, false)?;
            cmd.faults += 1;
        }
        cmd.cpages = npages;
        Ok((out, cmd))
    }

    /// dmirror WRITE: stores `data` (whole pages) at `addr` through
    /// writable device entries, faulting for writing where missing.
    ///
    /// # Errors
    /// `Inval`; `Perm` for a read-only VMA; `Fault`, as dmirror, where the
    /// write fault finds this device's own memory mapped read-only (a
    /// forked child's inherited device pages: the fault reports them
    /// without migrating them back, so they cannot become writable here;
    /// migrate them to system memory first).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Cmd, DmirrorError> {
        let npages = data.len() as u64 / PAGE_SIZE;
        if data.len() as u64 % PAGE_SIZE != 0 {
            return Err(DmirrorError::Inval);
        }
        let (start, end) = check_buf(addr, npages)?;
        let mut cmd = Cmd::default();
        let mut at = start;
        let mut rounds = 0;
        loop {
            {
                let pt = self.inner.lock();
                while at < end {
                    let Some(&(f, Tag::Write)) = pt.get(&at) else {
                        break;
                    };
                    self.inner.counters.accesses.fetch_add(1, Ordering::Relaxed);
                    self.inner.checked(at, f, true)?;
                    let off = (at - start) as usize;
                    self.inner
                        .mm
                        .phys()
                        .write_frame(f, 0, &data[off..off + PAGE_SIZE as usize])
                        .map_err(|_| DmirrorError::Violation)?;
                    at += PAGE_SIZE;
                }
            }
            if at >= end {
                break;
            }
            rounds += 1;
            if rounds > MAX_ROUNDS {
                return Err(DmirrorError::Busy);
            }
            self.fault_rest(at, end, true)?;
            cmd.faults += 1;
        }
        cmd.cpages = npages;
        Ok(cmd)
    }

    fn fault_rest(&self, from: u64, end: u64, write: bool) -> Result<(), DmirrorError> {
        self.inner.counters.faults.fetch_add(1, Ordering::Relaxed);
        let mut a = from;
        while a < end {
            let next = (a + CHUNK_PAGES * PAGE_SIZE).min(end);
            self.inner.range_fault(a, next, write)?;
            a = next;
        }
        Ok(())
    }

    /// dmirror MIGRATE_TO_DEV: migrates `npages` from `addr` into this
    /// device's memory (per 64-page chunk clipped to its VMA), maps them in
    /// the device page table, then reads the range back without faulting.
    ///
    /// # Errors
    /// `Inval` if a chunk has no readable VMA; `NoEnt` if some page could not
    /// be migrated (shared memory, another device's page).
    pub fn migrate_to_device(
        &self,
        addr: u64,
        npages: u64,
    ) -> Result<(Vec<u8>, Cmd), DmirrorError> {
        let (start, end) = check_buf(addr, npages)?;
        let mm = self.inner.mm.get().map_err(|_| DmirrorError::Inval)?;
        let mut a = start;
        while a < end {
            let next = migration_chunk_end(&mm, a, end)?;
            MIGRATING_TO_DEVICE.with(|m| m.set(Some(self.inner.owner)));
            // dmirror_devmem_alloc_page: a FAIL_ALLOC flag fails one
            // allocation and clears itself.
            let flags = &self.inner.flags;
            let mut may_alloc =
                || flags.fetch_and(!flags::FAIL_ALLOC, Ordering::AcqRel) & flags::FAIL_ALLOC == 0;
            let moved = mm.migrate_to_device_with(a, next - a, self.inner.owner, &mut may_alloc);
            MIGRATING_TO_DEVICE.with(|m| m.set(None));
            let moved = moved.map_err(|_| DmirrorError::Inval)?;
            let pages: Vec<_> = moved
                .iter()
                .map(|m| {
                    (
                        m.addr,
                        m.frame,
                        if m.writable { Tag::Write } else { Tag::Read },
                    )
                })
                .collect();
            self.inner.install(
                &pages,
                |k, pfn| matches!(k, PteKind::DevicePrivate { pfn: p, .. } if *p == pfn),
            );
            a = next;
        }
        // Read back without faulting.
        let mut out = vec![0u8; (end - start) as usize];
        let at = self.inner.copy_out(start, end, &mut out, start)?;
        if at < end {
            return Err(DmirrorError::NoEnt);
        }
        Ok((
            out,
            Cmd {
                cpages: npages,
                faults: 0,
            },
        ))
    }

    /// dmirror MIGRATE_TO_SYS: migrates this device's pages in the range
    /// back to system memory, per 64-page chunk clipped to its VMA;
    /// `cpages` counts the pages migrated.
    ///
    /// # Errors
    /// `Inval` for bad ranges, and (as dmirror) where a chunk starts outside
    /// any VMA or in one that is not readable (`PROT_NONE`).
    pub fn migrate_to_system(&self, addr: u64, npages: u64) -> Result<Cmd, DmirrorError> {
        let (start, end) = check(addr, npages)?;
        let mm = self.inner.mm.get().map_err(|_| DmirrorError::Inval)?;
        let mut cpages = 0;
        let mut a = start;
        while a < end {
            let next = migration_chunk_end(&mm, a, end)?;
            cpages += mm.migrate_to_ram(a, next - a, self.inner.owner)?.len() as u64;
            a = next;
        }
        Ok(Cmd { cpages, faults: 0 })
    }

    /// dmirror SNAPSHOT: one byte per page describing what the primary maps
    /// (see [`prot`]), without faulting, through a temporary interval
    /// notifier per chunk.
    ///
    /// # Errors
    /// `Inval`; `Busy` after too many collisions.
    pub fn snapshot(&self, addr: u64, npages: u64) -> Result<(Vec<u8>, Cmd), DmirrorError> {
        let (start, end) = check_buf(addr, npages)?;
        let mut out = Vec::with_capacity(npages as usize);
        let Ok(mm) = self.inner.mm.get() else {
            return Err(DmirrorError::Inval);
        };
        /// dmirror's snapshot notifier: records the sequence under the
        /// device lock, drops nothing.
        struct SeqOnly(Weak<MirrorState>);
        impl IntervalOps for SeqOnly {
            fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
                let Some(dev) = self.0.upgrade() else {
                    sub.set_seq(seq);
                    return true;
                };
                dev.pt.invalidate(sub, r, seq, |_| ()).is_some()
            }
        }
        let mut a = start;
        while a < end {
            let next = (a + CHUNK_PAGES * PAGE_SIZE).min(end);
            let tmp = mm
                .subscriptions()
                .interval_insert(a, next - a, Arc::new(SeqOnly(Arc::downgrade(&self.inner))))
                .map_err(|_| DmirrorError::Inval)?;
            let mut done = false;
            for _ in 0..MAX_COLLISIONS {
                let seq = tmp.read_begin().map_err(|_| DmirrorError::Fault)?;
                let mut range = HmmRange::new(&tmp, seq, a, next);
                range.dev_private_owner = Some(self.inner.owner);
                let r = {
                    let g = mm.mmap_read();
                    g.range_fault(&mut range)
                };
                match r {
                    Err(MmError::Busy) => continue,
                    Err(e) => {
                        let _ = tmp.remove();
                        return Err(e.into());
                    }
                    Ok(()) => {}
                }
                let phys = mm.phys();
                let read = self.inner.pt.commit(&tmp, seq, |_| {
                    range
                        .pfns
                        .iter()
                        .map(|p| {
                            if p.error {
                                return prot::ERROR;
                            }
                            if !p.valid {
                                return prot::NONE;
                            }
                            let rw = if p.write { prot::WRITE } else { prot::READ };
                            let base = match (p.zero, p.frame.map(|f| phys.kind(f.pfn))) {
                                (true, _) => prot::ZERO,
                                (_, Some(FrameKind::DevicePrivate(o))) if o == self.inner.owner => {
                                    prot::DEV_PRIVATE_LOCAL
                                }
                                (_, Some(FrameKind::DevicePrivate(_))) => prot::DEV_PRIVATE_REMOTE,
                                _ => 0,
                            };
                            // dmirror_mkentry: the primary's mapping order.
                            let order = match p.order {
                                softmm::PMD_ORDER => prot::PMD,
                                18 => prot::PUD,
                                _ => 0,
                            };
                            base | rw | order
                        })
                        .collect::<Vec<u8>>()
                });
                let Some(read) = read else { continue };
                out.extend(read);
                done = true;
                break;
            }
            let _ = tmp.remove();
            if !done {
                return Err(DmirrorError::Busy);
            }
            a = next;
        }
        Ok((
            out,
            Cmd {
                cpages: npages,
                faults: 0,
            },
        ))
    }

    /// dmirror EXCLUSIVE: makes the range device-exclusive (EXCLUSIVE
    /// invalidations with no owner, which this mirror honours), maps the
    /// pages with the atomic tag, then reads the range back.
    ///
    /// # Errors
    /// `Inval`; `Busy` if some page could not be made exclusive; `NoEnt`,
    /// as dmirror, if an entry was invalidated before the read-back.
    pub fn exclusive(&self, addr: u64, npages: u64) -> Result<(Vec<u8>, Cmd), DmirrorError> {
        let (start, end) = check_buf(addr, npages)?;
        let mm = self.inner.mm.get().map_err(|_| DmirrorError::Inval)?;
        let mut a = start;
        while a < end {
            let next = (a + CHUNK_PAGES * PAGE_SIZE).min(end);
            let frames = mm.make_device_exclusive(a, next - a, None)?;
            let pages: Vec<_> = frames
                .iter()
                .enumerate()
                .filter_map(|(i, f)| f.map(|f| (a + i as u64 * PAGE_SIZE, f, Tag::Atomic)))
                .collect();
            if pages.len() as u64 == (next - a) / PAGE_SIZE {
                self.inner.install(
                    &pages,
                    |k, pfn| matches!(k, PteKind::DeviceExclusive { pfn: p, .. } if *p == pfn),
                );
            } else {
                return Err(DmirrorError::Busy);
            }
            a = next;
        }
        let mut out = vec![0u8; (end - start) as usize];
        let at = self.inner.copy_out(start, end, &mut out, start)?;
        if at < end {
            // An entry vanished before the read-back (an invalidation of
            // the range meanwhile): dmirror_do_read's -ENOENT.
            return Err(DmirrorError::NoEnt);
        }
        Ok((
            out,
            Cmd {
                cpages: npages,
                faults: 0,
            },
        ))
    }

    /// dmirror CHECK_EXCLUSIVE: `Perm` if any page still has an atomic entry.
    ///
    /// # Errors
    /// `Perm`, `Inval`.
    pub fn check_exclusive(&self, addr: u64, npages: u64) -> Result<(), DmirrorError> {
        let (start, end) = check(addr, npages)?;
        let pt = self.inner.lock();
        if pt.range(start..end).any(|(_, &(_, t))| t == Tag::Atomic) {
            return Err(DmirrorError::Perm);
        }
        Ok(())
    }

    /// dmirror RELEASE: evicts this device's memory mapped in this mirror's
    /// address space back to system memory, over every VMA.
    ///
    /// Deliberate difference: dmirror's RELEASE evicts the device's memory
    /// of every process (it walks the device's chunks and migrates what
    /// they hold); softmm has no reverse map from a frame to the address
    /// spaces mapping it, so this evicts only this address space's pages: a
    /// forked child keeps the device pages it inherited until it migrates
    /// or releases them itself.
    ///
    /// # Errors
    /// `NoMem`.
    pub fn release_device_memory(&self) -> Result<Cmd, DmirrorError> {
        let mm = self.inner.mm.get().map_err(|_| DmirrorError::Inval)?;
        let mut cpages = 0;
        for v in mm.vmas() {
            cpages += mm
                .migrate_to_ram(v.start, v.end - v.start, self.inner.owner)?
                .len() as u64;
        }
        Ok(Cmd { cpages, faults: 0 })
    }

    /// dmirror FLAGS: sets this mirror's flags ([`flags`]).
    ///
    /// # Errors
    /// `Inval` for a bit dmirror does not know.
    pub fn set_flags(&self, bits: u64) -> Result<(), DmirrorError> {
        if bits & !flags::FAIL_ALLOC != 0 {
            return Err(DmirrorError::Inval);
        }
        self.inner.flags.store(bits, Ordering::Release);
        Ok(())
    }

    /// The device-side view of one page: the frame and tag, if mapped.
    pub fn entry(&self, addr: u64) -> Option<(FrameRef, Tag)> {
        self.inner.lock().get(&addr).copied()
    }
}

impl Drop for DeviceMirror {
    fn drop(&mut self) {
        // close(): remove the notifier; device memory stays where it is.
        if let Some(sub) = self.inner.sub.get() {
            let _ = sub.remove();
        }
        if let Some(pagemap) = self.inner.pagemap.get() {
            self.inner
                .mm
                .phys()
                .unregister_pagemap(self.inner.owner, pagemap);
        }
    }
}
