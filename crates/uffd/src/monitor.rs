//! The monitor thread: turns userfaultfd events into invalidations.
//!
//! Locking scheme (the flush protocol). The kernel lets a thread's munmap
//! (mremap, madvise) return as soon as the monitor has *read* its event, not
//! when the monitor has handled it. So the monitor never reads while idle:
//! it blocks in `poll` (which dequeues nothing), then takes `handling`, sets
//! `busy`, reads every pending event and runs the invalidations, and clears
//! `busy` before releasing `handling`. An event is therefore only ever
//! dequeued while `busy` is set, and a change that has returned to its
//! caller has its invalidation either finished or covered by `busy`:
//! [`Shared::flush`] loads `busy` (one load on the fast path) and, if set,
//! waits for `handling`. The monitor blocks in the kernel the rest of the
//! time, so it costs other threads nothing (a spinning thread would add a
//! TLB-shootdown IPI to every munmap of the process).
//!
//! That covers changes that *returned*. A munmap's pages are gone, and its
//! addresses free for another thread's mmap, before its event is even
//! queued; a lookup of that new mapping must not find the old registration
//! either. With [`FlushScope::Started`] a flush therefore first waits until
//! the kernel has no unread event (its `mmap_changing` count, probed with
//! one `ioctl`), then does the above: every change that had taken effect
//! when the flush began is then handled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::ThreadId;

use mmu_notifier::{Event, Range, Subscriptions, PAGE_SIZE};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;

use crate::coverage::Coverage;
use crate::error::UffdError;
use crate::sys::{ForkSentinel, Message, MsgBuf, Uffd, VmaQuery};

/// Counters of one process monitor.
#[derive(Debug, Default)]
pub struct MonitorStats {
    /// UNMAP events (munmap, MAP_FIXED over, the old range of mremap).
    pub unmaps: AtomicU64,
    /// REMOVE events (madvise DONTNEED / FREE / REMOVE).
    pub removes: AtomicU64,
    /// REMAP events (mremap moves).
    pub remaps: AtomicU64,
    /// Page faults delivered to the monitor (never expected in write-protect
    /// mode; the faulting thread is woken at once).
    pub faults: AtomicU64,
    /// Lookups whose flush waited for the monitor.
    pub flush_waits: AtomicU64,
    /// Watched ranges registered with the userfaultfd.
    pub registers: AtomicU64,
    /// Ranges unregistered because no watch covered them any more.
    pub unregisters: AtomicU64,
}

/// Which changes [`ProcessMm::flush`](crate::ProcessMm::flush) (and so every
/// `RegCache` lookup) waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushScope {
    /// Every munmap, mremap and madvise that *returned* before the flush.
    /// One atomic load when the monitor is idle. Enough when the thread that
    /// looks up is ordered after the thread that changed the memory (it
    /// waited for it, or it is the same thread), which is the contract of
    /// the kernel's own event delivery.
    #[default]
    Returned,
    /// Also every change still *in progress* in another thread whose effect
    /// the caller may already see: a munmap frees its addresses before its
    /// event is queued, so another thread's mmap can get the same addresses
    /// and look them up while the old registration is still valid. Costs one
    /// `ioctl` per flush (about 340 ns on the machine this was measured on).
    /// Use it when threads map and unmap memory without ordering themselves
    /// against the threads that look it up (several threads calling
    /// malloc/free of large blocks, for example).
    Started,
}

/// State shared by the handles, the watches and the monitor thread.
pub(crate) struct Shared {
    pub(crate) subs: Subscriptions,
    /// `None` once shut down: closing the descriptor unregisters every range
    /// and wakes any thread waiting on an event. A lock readers share, as
    /// [`FlushScope::Started`] reads it on every flush.
    pub(crate) uffd: RwLock<Option<Arc<Uffd>>>,
    pub(crate) scope: FlushScope,
    pub(crate) coverage: Mutex<Coverage>,
    pub(crate) busy: AtomicBool,
    handling: Mutex<()>,
    pub(crate) dead: AtomicBool,
    pub(crate) why_dead: Mutex<Option<String>>,
    pub(crate) sentinel: ForkSentinel,
    pub(crate) vmas: VmaQuery,
    stop: std::os::fd::OwnedFd,
    pub(crate) monitor: OnceLock<ThreadId>,
    pub(crate) stats: MonitorStats,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The descriptor, if not shut down (poisoning ignored, as by [`lock`]).
pub(crate) fn current_uffd(l: &RwLock<Option<Arc<Uffd>>>) -> Option<Arc<Uffd>> {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Closes this reference to the descriptor.
pub(crate) fn take_uffd(l: &RwLock<Option<Arc<Uffd>>>) -> Option<Arc<Uffd>> {
    l.write().unwrap_or_else(|e| e.into_inner()).take()
}

impl Shared {
    pub(crate) fn new(
        uffd: Uffd,
        sentinel: ForkSentinel,
        vmas: VmaQuery,
        scope: FlushScope,
    ) -> Result<Shared, UffdError> {
        use rustix::event::{eventfd, EventfdFlags};
        let stop =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(UffdError::Setup)?;
        Ok(Shared {
            subs: Subscriptions::new(),
            uffd: RwLock::new(Some(Arc::new(uffd))),
            scope,
            coverage: Mutex::new(Coverage::default()),
            busy: AtomicBool::new(false),
            handling: Mutex::new(()),
            dead: AtomicBool::new(false),
            why_dead: Mutex::new(None),
            sentinel,
            vmas,
            stop,
            monitor: OnceLock::new(),
            stats: MonitorStats::default(),
        })
    }

    /// The error every operation returns once the monitor is gone.
    pub(crate) fn check_live(&self) -> Result<(), UffdError> {
        if self.sentinel.forked() {
            return Err(UffdError::Forked);
        }
        if self.dead.load(Ordering::Acquire) {
            let why = lock(&self.why_dead).clone();
            return Err(UffdError::Dead(why.unwrap_or_else(|| "shut down".into())));
        }
        Ok(())
    }

    /// Waits until the invalidations of every change that returned before
    /// this call have run. See the module docs.
    #[inline]
    pub(crate) fn flush(&self) -> Result<(), UffdError> {
        // First: in a forked child the monitor does not exist and the
        // `handling` lock may have been copied locked.
        if self.sentinel.forked() {
            return Err(UffdError::Forked);
        }
        if self.scope == FlushScope::Started {
            self.wait_for_unread_events()?;
        }
        if self.busy.load(Ordering::SeqCst) {
            self.flush_slow();
        }
        if self.dead.load(Ordering::Acquire) {
            return self.check_live();
        }
        Ok(())
    }

    /// Waits until the kernel holds no event the monitor has not read (see
    /// the module docs); the caller then waits for their handling as usual.
    fn wait_for_unread_events(&self) -> Result<(), UffdError> {
        // The monitor reads events; it must not wait for itself.
        if self.monitor.get() == Some(&std::thread::current().id()) {
            return Ok(());
        }
        let Some(uffd) = current_uffd(&self.uffd) else {
            return self.check_live();
        };
        let mut spins = 0u32;
        while uffd.changes_pending() {
            // Shut down or died: nobody will read them.
            self.check_live()?;
            spins += 1;
            if spins < 16 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        Ok(())
    }

    #[cold]
    fn flush_slow(&self) {
        // The monitor's own callbacks see their own invalidation as done.
        if self.monitor.get() == Some(&std::thread::current().id()) {
            return;
        }
        self.stats.flush_waits.fetch_add(1, Ordering::Relaxed);
        drop(lock(&self.handling));
    }

    /// Asks the monitor thread to exit.
    pub(crate) fn stop(&self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
    }

    pub(crate) fn mark_dead(&self, why: &str) {
        let mut w = lock(&self.why_dead);
        if w.is_none() {
            *w = Some(why.to_string());
        }
        self.dead.store(true, Ordering::Release);
    }

    /// The monitor cannot go on: lookups fail from now on, and the
    /// descriptor is closed (with the monitor's own reference, when it
    /// returns) so no munmap waits for a reader that is gone.
    fn die(&self, why: &str) {
        tracing::error!("uffd: the monitor stops: {why}");
        self.mark_dead(why);
        take_uffd(&self.uffd);
    }

    /// Runs one invalidation of `[start, end)`, rounded out to pages.
    fn invalidate(&self, start: u64, end: u64, event: Event) {
        let start = start & !(PAGE_SIZE - 1);
        let end = end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let Ok(range) = Range::new(start, end, event) else {
            return;
        };
        // Callback panics are caught and reported by the subsystem; this
        // guard only keeps the monitor reading if something else panics, as
        // a dead monitor would leave every munmap of a watched range
        // blocked.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.subs.invalidate_range_start(range).end();
        }));
        if r.is_err() {
            tracing::error!("uffd: an invalidation of {start:#x}..{end:#x} panicked");
        }
    }

    fn handle(&self, uffd: &Uffd, m: Message) {
        let s = &self.stats;
        match m {
            Message::Unmap { start, end } => {
                s.unmaps.fetch_add(1, Ordering::Relaxed);
                self.invalidate(start, end, Event::Unmap);
            }
            Message::Remove { start, end } => {
                s.removes.fetch_add(1, Ordering::Relaxed);
                self.invalidate(start, end, Event::Clear);
            }
            Message::Remap { from, len, .. } => {
                s.remaps.fetch_add(1, Ordering::Relaxed);
                self.invalidate(from, from.saturating_add(len), Event::Unmap);
            }
            Message::PageFault { address } => {
                s.faults.fetch_add(1, Ordering::Relaxed);
                let _ = uffd.wake(address & !(PAGE_SIZE - 1), PAGE_SIZE);
            }
            Message::Other(e) => tracing::warn!("uffd: unexpected event {e}"),
        }
    }

    /// Reads and handles every pending event; `Err` on a fatal read error.
    fn drain(&self, uffd: &Uffd, buf: &mut MsgBuf) -> Result<(), Errno> {
        let _h = lock(&self.handling);
        self.busy.store(true, Ordering::SeqCst);
        let r = loop {
            match uffd.read(buf) {
                Ok(msgs) => {
                    let full = msgs.len() == 64;
                    for m in msgs {
                        self.handle(uffd, Message::decode(m));
                    }
                    if !full {
                        break Ok(());
                    }
                }
                Err(Errno::AGAIN) => break Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => break Err(e),
            }
        };
        self.busy.store(false, Ordering::Release);
        r
    }

    /// The monitor thread's body.
    pub(crate) fn run(&self, uffd: Arc<Uffd>) {
        let _ = self.monitor.set(std::thread::current().id());
        let mut buf = MsgBuf::new();
        loop {
            let mut fds = [
                PollFd::new(&*uffd, PollFlags::IN),
                PollFd::new(&self.stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return self.die(&format!("poll failed: {e}")),
            }
            if !fds[1].revents().is_empty() {
                return;
            }
            if fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) {
                return self.die("the userfaultfd reported an error");
            }
            if let Err(e) = self.drain(&uffd, &mut buf) {
                return self.die(&format!("reading the userfaultfd failed: {e}"));
            }
        }
    }
}
