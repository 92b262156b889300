//! [`ProcessMm`]: this process's address space as a primary MMU.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mmu_notifier::{
    IntervalNotifier, IntervalOps, MmapReadGuard, MmapWriteGuard, SubscriptionsRef, PAGE_SIZE,
};

use crate::error::UffdError;
use crate::monitor::{current_uffd, lock, take_uffd, FlushScope, MonitorShared, MonitorStats};
use crate::sys::{self, ForkSentinel, Uffd, VmaQuery};

/// Highest user address on x86-64 and arm64 with 4-level page tables
/// (47 bits); mappings above it need an explicit hint and are refused.
pub const USER_ADDRESS_LIMIT: u64 = 1 << 47;

/// The calling process's address space as a primary MMU.
///
/// Two monitor threads (one reading events, one running the callbacks) own
/// a userfaultfd and turn its events into
/// invalidations on [`subscriptions`](Self::subscriptions): munmap (and
/// `MAP_FIXED` over a range, and the old range of an mremap move) into
/// [`Event::Unmap`](mmu_notifier::Event::Unmap), madvise
/// `DONTNEED`/`FREE`/`REMOVE` into [`Event::Clear`](mmu_notifier::Event::Clear).
/// Only [watched](Self::watch) ranges produce events; a watch lasts as long
/// as the mapping under it (after an UNMAP invalidation the owner re-inserts,
/// as a registration cache does anyway).
///
/// Changes that do not go through the address-space layout (page migration,
/// swap, KSM, COW after fork) produce no event: a user-space registration
/// cache does not need them, because the registration itself (the kernel's
/// long-term pin behind `ibv_reg_mr`) keeps those pages in place.
///
/// A handle is cheap to clone; the monitor stops with
/// [`shutdown`](Self::shutdown) or when the last handle is dropped, which
/// also runs the subsystem's exit path (every notifier's `release`).
///
/// ```no_run
/// use std::sync::Arc;
/// use mmu_notifier::{IntervalNotifier, IntervalOps, Range};
/// use uffd::ProcessMm;
///
/// struct Log;
/// impl IntervalOps for Log {
///     fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
///         sub.set_seq(seq);
///         println!("{:?} {:#x}..{:#x}", r.event(), r.start(), r.end());
///         true
///     }
/// }
///
/// let mm = ProcessMm::new()?;
/// let buf = vec![0u8; 1 << 20].leak(); // any anonymous memory
/// let start = (buf.as_ptr() as u64 + 4095) & !4095;
/// let sub = mm.interval_insert(start, 65536, Arc::new(Log))?;
/// // ... a munmap or madvise(DONTNEED) of that range now calls Log ...
/// mm.flush()?; // every change that returned has been delivered
/// sub.remove()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ProcessMm {
    handle: Arc<Handle>,
}

/// Owns the monitor threads (reader and handler); the last [`ProcessMm`]
/// clone stops them.
struct Handle {
    shared: Arc<MonitorShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ProcessMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessMm")
            .field("live", &self.is_live())
            .field("stats", &self.handle.shared.stats)
            .finish()
    }
}

fn check_range(start: u64, len: u64) -> Result<(u64, u64), UffdError> {
    let end = start
        .checked_add(len)
        .filter(|&e| len > 0 && e <= USER_ADDRESS_LIMIT)
        .ok_or(UffdError::BadRange { start, len })?;
    Ok((
        start & !(PAGE_SIZE - 1),
        (end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1),
    ))
}

impl ProcessMm {
    /// Opens a userfaultfd and starts the monitor threads.
    ///
    /// # Errors
    /// [`UffdError::Unavailable`] (with the remedy: sysctl, capability,
    /// seccomp), [`UffdError::Api`] on kernels without the events,
    /// [`UffdError::Setup`] / [`UffdError::Thread`].
    pub fn new() -> Result<ProcessMm, UffdError> {
        Self::with_scope(FlushScope::default())
    }

    /// As [`new`](Self::new), with the given [`FlushScope`]: which changes
    /// [`flush`](Self::flush) waits for.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_scope(scope: FlushScope) -> Result<ProcessMm, UffdError> {
        let uffd = Uffd::open()?;
        let sentinel = ForkSentinel::new().map_err(UffdError::Setup)?;
        let vmas = VmaQuery::new().map_err(UffdError::Setup)?;
        let shared = Arc::new(MonitorShared::new(uffd, sentinel, vmas, scope)?);
        let uffd = current_uffd(&shared.uffd).expect("just opened");
        let (r, h) = (shared.clone(), shared.clone());
        let handler = std::thread::Builder::new()
            .name("uffd-monitor".into())
            .spawn(move || h.run_handler())
            .map_err(UffdError::Thread)?;
        let handle = Handle {
            shared,
            threads: Mutex::new(vec![handler]),
        };
        // On an error from here on, dropping `handle` stops the handler.
        let reader = std::thread::Builder::new()
            .name("uffd-reader".into())
            .spawn(move || r.run_reader(uffd))
            .map_err(UffdError::Thread)?;
        lock(&handle.threads).push(reader);
        Ok(ProcessMm {
            handle: Arc::new(handle),
        })
    }

    /// The address space's subscriptions: register classic notifiers here
    /// (and [`watch`](Self::watch) the ranges they care about).
    pub fn subscriptions(&self) -> &SubscriptionsRef {
        &self.handle.shared.subs
    }

    /// The primary's side of the subscriptions, with the hooks the monitor
    /// calls: for code that acts as this address space's core mm (a test
    /// announcing an invalidation of its own). Secondaries use
    /// [`subscriptions`](Self::subscriptions).
    pub fn primary_subscriptions(&self) -> &mmu_notifier::Subscriptions {
        &self.handle.shared.subs
    }

    /// The subsystem's mmap write lock; registrations made with it held
    /// are its methods (`register`, `get`, `interval_insert`).
    pub fn mmap_write(&self) -> MmapWriteGuard<'_> {
        self.subscriptions().mmap_write()
    }

    /// The subsystem's mmap read lock.
    pub fn mmap_read(&self) -> MmapReadGuard<'_> {
        self.subscriptions().mmap_read()
    }

    /// Which changes [`flush`](Self::flush) waits for.
    pub fn scope(&self) -> FlushScope {
        self.handle.shared.scope
    }

    /// The monitor's counters.
    pub fn stats(&self) -> &MonitorStats {
        &self.handle.shared.stats
    }

    /// True until [`shutdown`](Self::shutdown) or a monitor failure, and
    /// false in a child forked after this was made.
    pub fn is_live(&self) -> bool {
        self.handle.shared.check_live().is_ok()
    }

    /// Number of disjoint segments watches cover now (0 when nothing is
    /// watched: every range was unregistered from the userfaultfd).
    pub fn watched_segments(&self) -> usize {
        lock(&self.handle.shared.coverage).segments()
    }

    /// Starts delivering invalidations for `[start, start + len)` (rounded
    /// out to the mappings that contain it: registering part of a mapping
    /// would split it, and mremap refuses to move a buffer made of several
    /// mappings) until the returned [`Watch`] is dropped and no other
    /// watch covers the range. The range must be mapped, by anonymous,
    /// shmem or hugetlbfs memory.
    ///
    /// # Errors
    /// [`UffdError::BadRange`]; [`UffdError::Register`] (unmapped, a
    /// regular-file mapping, another userfaultfd); [`UffdError::Forked`] /
    /// [`UffdError::Dead`].
    pub fn watch(&self, start: u64, len: u64) -> Result<Watch, UffdError> {
        let s = &self.handle.shared;
        let (start, end) = check_range(start, len)?;
        s.check_live()?;
        let mut cov = lock(&s.coverage);
        let uffd = current_uffd(&s.uffd).ok_or_else(|| UffdError::Dead("shut down".into()))?;
        // Register whole mappings (see `VmaQuery`), and always, even where
        // another watch covers the range: a mapping made after an UNMAP
        // there is a new VMA, which is not registered.
        let register_error = |errno| UffdError::Register {
            start,
            len: end - start,
            errno,
        };
        let (start, end) = s
            .vmas
            .extent(start, end)
            .map_err(register_error)?
            .ok_or(register_error(rustix::io::Errno::NOMEM))?;
        uffd.register(start, end - start).map_err(register_error)?;
        s.stats.registers.fetch_add(1, Ordering::Relaxed);
        cov.add(start, end);
        Ok(Watch {
            shared: s.clone(),
            start,
            end,
        })
    }

    /// Inserts an interval notifier over `[start, start + len)` and watches
    /// the range for as long as it is inserted.
    ///
    /// # Errors
    /// As [`watch`](Self::watch), plus the subsystem's insert errors (as
    /// [`UffdError::Notifier`]).
    pub fn interval_insert(
        &self,
        start: u64,
        len: u64,
        ops: Arc<dyn IntervalOps>,
    ) -> Result<ProcessInterval, UffdError> {
        let watch = self.watch(start, len)?;
        let sub = self
            .subscriptions()
            .interval_insert(start, len, ops)
            .map_err(UffdError::Notifier)?;
        Ok(ProcessInterval { sub, _watch: watch })
    }

    /// Waits until the invalidations of every munmap, mremap and madvise
    /// that returned before this call have run (and, with
    /// [`FlushScope::Started`], of every one that had taken effect). One
    /// atomic load when the monitor is idle, plus one `ioctl` with
    /// `Started`. Call it before trusting any state the callbacks maintain
    /// (a registration cache does it on every lookup).
    ///
    /// # Errors
    /// [`UffdError::Forked`] in a forked child, [`UffdError::Dead`] after
    /// shutdown or a monitor failure.
    #[inline]
    pub fn flush(&self) -> Result<(), UffdError> {
        self.handle.shared.flush()
    }

    /// Faults `[start, start + len)` in (for writing if `write`) without
    /// changing its contents: what a registration's page walk does.
    ///
    /// # Errors
    /// [`UffdError::BadRange`]; [`UffdError::Populate`] for holes or
    /// missing permissions; [`UffdError::Forked`] / [`UffdError::Dead`].
    pub fn pin(&self, start: u64, len: u64, write: bool) -> Result<ProcessPin, UffdError> {
        check_range(start, len)?;
        self.handle.shared.check_live()?;
        populate(start, len, write)
    }

    /// Stops the monitor and runs the subsystem's exit path: every list
    /// notifier's `release`, and one RELEASE invalidation for interval
    /// notifiers. Later lookups and watches fail with [`UffdError::Dead`];
    /// munmaps no longer wait for the monitor. Idempotent.
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }
}

impl Handle {
    fn shutdown(&self) {
        let s = &self.shared;
        if s.sentinel.forked() {
            // The monitor threads do not exist in a child.
            s.mark_dead("forked");
            return;
        }
        s.mark_dead("shut down");
        s.stop();
        for t in std::mem::take(&mut *lock(&self.threads)) {
            let _ = t.join();
        }
        take_uffd(&s.uffd);
        let _ = s.subs.release();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Keeps a range watched; see [`ProcessMm::watch`].
pub struct Watch {
    shared: Arc<MonitorShared>,
    start: u64,
    end: u64,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watch({:#x}..{:#x})", self.start, self.end)
    }
}

impl Watch {
    /// The watched range: whole mappings around the requested range.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let s = &self.shared;
        let mut cov = lock(&s.coverage);
        let freed = cov.remove(self.start, self.end);
        if s.sentinel.forked() {
            return;
        }
        let Some(uffd) = current_uffd(&s.uffd) else {
            return;
        };
        for (a, b) in freed {
            // Only whole mappings: unregistering part of one splits it (the
            // mapping may have changed, or merged with a neighbour, since it
            // was watched), and mremap refuses to move a buffer made of
            // several VMAs. A range left registered costs its munmaps a
            // monitor round trip and no notifier sees it.
            if s.vmas.extent(a, b) != Ok(Some((a, b))) {
                continue;
            }
            if uffd.unregister(a, b - a).is_ok() {
                s.stats.unregisters.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// An interval notifier on a [`ProcessMm`] together with the watch of its
/// range. Derefs to the [`IntervalNotifier`] (read_begin / read_retry).
///
/// Dropping it removes the notifier (as [`remove`](Self::remove), which
/// also reports errors) and then stops watching: a dropped handle never
/// leaves a notifier behind in the tree.
#[derive(Debug)]
pub struct ProcessInterval {
    sub: IntervalNotifier,
    /// Dropped after the notifier is removed (see `Drop`).
    _watch: Watch,
}

impl std::ops::Deref for ProcessInterval {
    type Target = IntervalNotifier;
    fn deref(&self) -> &IntervalNotifier {
        &self.sub
    }
}

impl ProcessInterval {
    /// Removes the notifier (waiting for a running invalidation, as
    /// `IntervalNotifier::remove`), then stops watching.
    ///
    /// # Errors
    /// The subsystem's remove errors (as [`UffdError::Notifier`]).
    pub fn remove(self) -> Result<(), UffdError> {
        // The watch goes when `self` is dropped, after the notifier.
        self.sub.remove().map_err(UffdError::Notifier)
    }
}

impl Drop for ProcessInterval {
    fn drop(&mut self) {
        if !self.sub.is_removed() {
            if let Err(e) = self.sub.remove() {
                tracing::warn!(
                    "uffd: dropping a ProcessInterval could not remove its notifier: {e}"
                );
            }
        }
    }
}

/// Memory faulted in for a registration ([`ProcessMm::pin`], [`Populate`]):
/// the page walk `ibv_reg_mr` makes.
/// (The long-term pin itself is the device driver's; this crate has none.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessPin {
    /// First address, page aligned.
    pub start: u64,
    /// Length in bytes, page aligned.
    pub len: u64,
    /// Faulted in for writing.
    pub write: bool,
}

impl regcache::AddressSpace for ProcessMm {
    type Watch = Watch;
    type Error = UffdError;

    fn subscriptions(&self) -> &SubscriptionsRef {
        ProcessMm::subscriptions(self)
    }

    fn watch(&self, start: u64, len: u64) -> Result<Watch, UffdError> {
        ProcessMm::watch(self, start, len)
    }

    #[inline]
    fn flush(&self) -> Result<(), UffdError> {
        ProcessMm::flush(self)
    }
}

/// Faults the whole pages of `[start, start + len)` in (a range
/// [`check_range`] accepted), for writing if `write`.
fn populate(start: u64, len: u64, write: bool) -> Result<ProcessPin, UffdError> {
    let (pstart, pend) = check_range(start, len)?;
    sys::populate(pstart, pend - pstart, write).map_err(|errno| UffdError::Populate {
        start,
        len,
        errno,
        access: if write { "writable" } else { "readable" },
    })?;
    Ok(ProcessPin {
        start: pstart,
        len: pend - pstart,
        write,
    })
}

/// A [`Registrar`](regcache::Registrar) without a device: registering
/// faults the range in (the page walk of `ibv_reg_mr`, through
/// `MADV_POPULATE_READ`/`WRITE`) and deregistering does nothing. For
/// exercising a `RegCache<ProcessMm, _>` without a device, and as the model
/// of a registrar whose device pins nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Populate;

impl regcache::Registrar for Populate {
    type Handle = ProcessPin;

    fn register(
        &self,
        start: u64,
        end: u64,
        access: regcache::Access,
    ) -> Result<ProcessPin, regcache::RegError> {
        let len = end - start;
        check_range(start, len).map_err(regcache::RegError::other)?;
        populate(start, len, access.writes()).map_err(regcache::RegError::unsupported)
    }

    fn deregister(&self, _: ProcessPin) -> Result<(), regcache::RegError> {
        Ok(())
    }
}
