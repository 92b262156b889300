//! The monitor: two threads that turn userfaultfd events into
//! invalidations.
//!
//! Why two. The kernel makes a thread's munmap (mremap, madvise) of watched
//! memory wait until the monitor has *read* its event. That thread may hold
//! a lock while it waits: glibc's `free` trims an arena (madvise, or munmap
//! through `brk`) with the arena's lock held. If the thread that read
//! events also ran the invalidations, and an invalidation freed memory of
//! that arena (a callback dropping a tree node another thread allocated),
//! it would wait for the arena lock while the arena's owner waits for it to
//! read: a deadlock, seen in practice with a registration cache under
//! threads that malloc and free. So the *reader* only reads: it never
//! allocates, frees or takes a lock an application thread can hold while it
//! unmaps (its queue's lock is held only to push and pop), and it never
//! waits for the *handler*: when the queue is full it folds further events
//! into one overflow range, invalidated as a whole (more invalidation is
//! always safe). The *handler* pops events and runs the invalidations; it
//! may block on anything, because whatever it waits for is at worst a
//! thread waiting for the reader, which is never stuck.
//!
//! Locking scheme (the flush protocol). A change returns to its caller once
//! its event is read, not once it is handled. The reader raises `reading`
//! before each read and, after it, adds the events to `read_seq` before it
//! lowers `reading`; the handler adds each event to `handled_seq` once its
//! invalidation ended. An event dequeued by the kernel is therefore always
//! covered: by `reading`, or by `read_seq`. [`MonitorShared::flush`] (three loads
//! on the fast path) waits, when `reading` is up or `handled_seq` is behind,
//! until `reading` is down and then until `handled_seq` reaches the
//! `read_seq` it saw. Both threads block in the kernel when idle, so the
//! monitor costs other threads nothing (a spinning thread would add a
//! TLB-shootdown IPI to every munmap of the process).
//!
//! That covers changes that *returned*. A munmap's pages are gone, and its
//! addresses free for another thread's mmap, before its event is even
//! queued; a lookup of that new mapping must not find the old registration
//! either. With [`FlushScope::Started`] (the default) a flush therefore
//! first waits until the kernel has no unread event (its `mmap_changing`
//! count, probed with one `ioctl`), then does the above: every change that
//! had taken effect when the flush began is then handled.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
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
    /// Events folded into an overflow range because the handler's queue was
    /// full (each such range is invalidated as a whole).
    pub overflowed: AtomicU64,
    /// Watched ranges registered with the userfaultfd.
    pub registers: AtomicU64,
    /// Ranges unregistered because no watch covered them any more.
    pub unregisters: AtomicU64,
}

/// Which changes [`ProcessMm::flush`](crate::ProcessMm::flush) (and so every
/// registration-cache lookup) waits for. The default is the exact scope,
/// [`Started`](FlushScope::Started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushScope {
    /// Every change that has taken effect, including one still *in
    /// progress* in another thread: a munmap frees its addresses before its
    /// event is queued, so another thread's mmap (a `malloc` of a large
    /// block) can get the same addresses and look them up while the old
    /// registration is still cached. The flush waits for such changes too.
    /// Costs one `ioctl` per flush (about 340 ns on the machine this was
    /// measured on). The default: a lookup never returns a registration of
    /// memory that changed before it started.
    #[default]
    Started,
    /// **Unsafe under threads that allocate and free memory concurrently;
    /// opt-in.** Only the changes that *returned* before the flush: one
    /// atomic load when the monitor is idle. Exact only when every thread
    /// that looks up is ordered after every change it may observe (it
    /// waited for the changing thread, or it is that thread). With threads
    /// that malloc/free independently it returns stale registrations:
    /// measured with io_uring fixed buffers (4 threads allocating, freeing
    /// and reallocating 4 KiB-1 MiB buffers with glibc, munmapping and
    /// madvising raw mappings, READ_FIXED into them through one cache, every
    /// byte verified; `cargo test --release -p uring-registrar --test
    /// end_to_end -- --ignored --nocapture`): **52 of 100 000 reads (0.05%)
    /// lost their data** (it went into the old pages), against 0 with
    /// `Started` (and 86 901, 87%, with no invalidation at all). A
    /// differently shaped workload measured 0.4-1.2%.
    Returned,
}

/// State shared by the handles, the watches and the monitor threads.
pub(crate) struct MonitorShared {
    pub(crate) subs: Subscriptions,
    /// `None` once shut down: closing the descriptor unregisters every range
    /// and wakes any thread waiting on an event. A lock readers share, as
    /// [`FlushScope::Started`] reads it on every flush.
    pub(crate) uffd: RwLock<Option<Arc<Uffd>>>,
    pub(crate) scope: FlushScope,
    pub(crate) coverage: Mutex<Coverage>,
    /// The reader is inside (or about to enter) a read of the descriptor.
    reading: AtomicBool,
    /// Events read so far, and events whose invalidation ended.
    read_seq: AtomicU64,
    handled_seq: AtomicU64,
    /// Read, not yet handled; the reader never waits on it.
    queue: Mutex<Queue>,
    /// Signalled when events are queued, handled, or the monitor stops.
    progress: Condvar,
    stopping: AtomicBool,
    pub(crate) dead: AtomicBool,
    pub(crate) why_dead: Mutex<Option<String>>,
    pub(crate) sentinel: ForkSentinel,
    pub(crate) vmas: VmaQuery,
    stop: std::os::fd::OwnedFd,
    /// The handler thread (callbacks run there) and the reader thread.
    pub(crate) monitor: OnceLock<ThreadId>,
    reader: OnceLock<ThreadId>,
    pub(crate) stats: MonitorStats,
}

/// Events the handler queue holds before the reader folds further ones
/// into the overflow range.
const QUEUE_CAPACITY: usize = 4096;

/// The reader-to-handler queue: fixed capacity (allocated once, so pushing
/// never allocates), plus one overflow range.
struct Queue {
    events: VecDeque<(u64, u64, Event)>,
    /// Union of the events that did not fit, and how many they were.
    overflow: Option<(u64, u64, u64)>,
}

impl Queue {
    fn push(&mut self, start: u64, end: u64, event: Event) -> bool {
        if self.events.len() < QUEUE_CAPACITY {
            self.events.push_back((start, end, event));
            return true;
        }
        self.overflow = Some(match self.overflow {
            Some((s, e, n)) => (s.min(start), e.max(end), n + 1),
            None => (start, end, 1),
        });
        false
    }
}

/// Locks one of the monitor's mutexes (poisoning ignored). They may sleep,
/// so reaching one from a non-blockable callback (dropping a `Watch` there)
/// is reported by the subsystem's debug check. (These are std mutexes, not
/// the facade's: the monitor's threads block in real syscalls, which shuttle
/// cannot schedule.)
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    mmu_notifier::might_sleep();
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

/// The descriptor, if not shut down (poisoning ignored, as by [`lock`]).
pub(crate) fn current_uffd(l: &RwLock<Option<Arc<Uffd>>>) -> Option<Arc<Uffd>> {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Closes this reference to the descriptor.
pub(crate) fn take_uffd(l: &RwLock<Option<Arc<Uffd>>>) -> Option<Arc<Uffd>> {
    l.write().unwrap_or_else(|e| e.into_inner()).take()
}

impl MonitorShared {
    pub(crate) fn new(
        uffd: Uffd,
        sentinel: ForkSentinel,
        vmas: VmaQuery,
        scope: FlushScope,
    ) -> Result<MonitorShared, UffdError> {
        use rustix::event::{eventfd, EventfdFlags};
        let stop =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(UffdError::Setup)?;
        Ok(MonitorShared {
            subs: Subscriptions::new(),
            uffd: RwLock::new(Some(Arc::new(uffd))),
            scope,
            coverage: Mutex::new(Coverage::default()),
            reading: AtomicBool::new(false),
            read_seq: AtomicU64::new(0),
            handled_seq: AtomicU64::new(0),
            queue: Mutex::new(Queue {
                events: VecDeque::with_capacity(QUEUE_CAPACITY),
                overflow: None,
            }),
            progress: Condvar::new(),
            stopping: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            why_dead: Mutex::new(None),
            sentinel,
            vmas,
            stop,
            monitor: OnceLock::new(),
            reader: OnceLock::new(),
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
        if self.reading.load(Ordering::SeqCst)
            || self.handled_seq.load(Ordering::SeqCst) != self.read_seq.load(Ordering::SeqCst)
        {
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
        if self.on_monitor() {
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

    /// Whether the caller is one of the monitor's threads.
    fn on_monitor(&self) -> bool {
        let me = std::thread::current().id();
        self.monitor.get() == Some(&me) || self.reader.get() == Some(&me)
    }

    #[cold]
    fn flush_slow(&self) {
        // The monitor's own callbacks see their own invalidation as done.
        if self.on_monitor() {
            return;
        }
        self.stats.flush_waits.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        // Every event dequeued before the flush is counted in `read_seq`
        // once `reading` is down.
        while self.reading.load(Ordering::SeqCst) && !self.dead.load(Ordering::Acquire) {
            q = wait(&self.progress, q);
        }
        let target = self.read_seq.load(Ordering::SeqCst);
        while self.handled_seq.load(Ordering::SeqCst) < target && !self.dead.load(Ordering::Acquire)
        {
            q = wait(&self.progress, q);
        }
    }

    /// Asks the monitor threads to exit.
    pub(crate) fn stop(&self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        self.stopping.store(true, Ordering::Release);
        let _q = lock(&self.queue);
        self.progress.notify_all();
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
        // Wake flushes waiting for events that will never be handled.
        let _q = lock(&self.queue);
        self.progress.notify_all();
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

    /// Reader side: queues one event (or wakes a faulting thread). Never
    /// allocates and never waits for the handler.
    fn queue_event(&self, uffd: &Uffd, q: &mut Queue, m: Message) -> u64 {
        let s = &self.stats;
        let (start, end, event) = match m {
            Message::Unmap { start, end } => {
                s.unmaps.fetch_add(1, Ordering::Relaxed);
                (start, end, Event::Unmap)
            }
            Message::Remove { start, end } => {
                s.removes.fetch_add(1, Ordering::Relaxed);
                (start, end, Event::Clear)
            }
            Message::Remap { from, len, .. } => {
                s.remaps.fetch_add(1, Ordering::Relaxed);
                (from, from.saturating_add(len), Event::Unmap)
            }
            Message::PageFault { address } => {
                s.faults.fetch_add(1, Ordering::Relaxed);
                let _ = uffd.wake(address & !(PAGE_SIZE - 1), PAGE_SIZE);
                return 0;
            }
            Message::Other(e) => {
                tracing::warn!("uffd: unexpected event {e}");
                return 0;
            }
        };
        if !q.push(start, end, event) {
            s.overflowed.fetch_add(1, Ordering::Relaxed);
        }
        1
    }

    /// Reads every pending event into the queue; `Err` on a fatal read
    /// error.
    fn read_pending(&self, uffd: &Uffd, buf: &mut MsgBuf) -> Result<(), Errno> {
        loop {
            self.reading.store(true, Ordering::SeqCst);
            let r = uffd.read(buf);
            let (n, full, r) = match r {
                Ok(msgs) => {
                    let full = msgs.len() == 64;
                    let mut q = lock(&self.queue);
                    let mut n = 0;
                    for m in msgs {
                        n += self.queue_event(uffd, &mut q, Message::decode(m));
                    }
                    self.read_seq.fetch_add(n, Ordering::SeqCst);
                    (n, full, Ok(()))
                }
                Err(Errno::INTR) => (0, true, Ok(())),
                Err(Errno::AGAIN) => (0, false, Ok(())),
                Err(e) => (0, false, Err(e)),
            };
            self.reading.store(false, Ordering::SeqCst);
            if n > 0 || r.is_err() {
                let _q = lock(&self.queue);
                self.progress.notify_all();
            }
            if !full || r.is_err() {
                return r;
            }
        }
    }

    /// The reader thread's body.
    pub(crate) fn run_reader(&self, uffd: Arc<Uffd>) {
        let _ = self.reader.set(std::thread::current().id());
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
            if let Err(e) = self.read_pending(&uffd, &mut buf) {
                return self.die(&format!("reading the userfaultfd failed: {e}"));
            }
        }
    }

    /// The handler thread's body: runs the queued invalidations until the
    /// monitor stops (then it handles what is left, so no flush waits for
    /// an event nobody will handle).
    pub(crate) fn run_handler(&self) {
        let _ = self.monitor.set(std::thread::current().id());
        loop {
            let next = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some((start, end, event)) = q.events.pop_front() {
                        break Some((start, end, event, 1));
                    }
                    if let Some((start, end, n)) = q.overflow.take() {
                        break Some((start, end, Event::Unmap, n));
                    }
                    if self.stopping.load(Ordering::Acquire) || self.dead.load(Ordering::Acquire) {
                        break None;
                    }
                    q = wait(&self.progress, q);
                }
            };
            let Some((start, end, event, n)) = next else {
                return;
            };
            self.invalidate(start, end, event);
            self.handled_seq.fetch_add(n, Ordering::SeqCst);
            let _q = lock(&self.queue);
            self.progress.notify_all();
        }
    }
}
