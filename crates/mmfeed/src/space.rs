//! [`FeedMm`]: this process's address space as a primary MMU whose hooks
//! come from the feed, and a [`regcache::AddressSpace`].

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mmu_notifier::{
    ActiveInvalidation, Event, Range, Subscriptions, SubscriptionsRef, END_OF_ADDRESS_SPACE,
};

use crate::error::FeedError;
use crate::feed::{relax, Feed};
use crate::loader::AttachPoint;
use crate::ring::{Kind, Slot};
use crate::sys::SharedWords;

/// `consumed` of a feed that cannot be trusted any more: no head equals it,
/// so every flush takes the slow path, which reports the error.
const UNTRUSTED: u64 = u64::MAX;

thread_local! {
    /// The address of the FeedMm whose records this thread is applying.
    static DRAINING: Cell<usize> = const { Cell::new(0) };
}

/// Clears [`DRAINING`] when a drain ends, however it ends.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        DRAINING.with(|d| d.set(0));
    }
}

/// What a [`FeedMm`] has done so far.
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Flushes that found new records (the others cost one load).
    pub drains: AtomicU64,
    /// `invalidate_range_start` calls made for START records.
    pub starts: AtomicU64,
    /// END records applied (each ends its thread's open STARTs).
    pub ends: AtomicU64,
    /// Times the reader fell behind the feed and invalidated everything.
    pub overruns: AtomicU64,
}

/// This process's address space, with `invalidate_range_start` and `_end`
/// driven by the feed: a START record (published when a call that takes
/// memory away *enters* the kernel) opens a pair on the
/// [`subscriptions`](Self::subscriptions), and its thread's END record
/// (published when the call returns) closes it.
///
/// The pairs are run by [`flush`](Self::flush), which every lookup of a
/// registration cache calls first: when nothing changed it is one acquire
/// load of the feed's head. When records arrived it applies them and, while
/// a START has no END yet, keeps waiting for it, so that when `flush`
/// returns no change it saw is still in flight. That is Linux's
/// `mmu_interval_read_begin` rule (wait while an invalidation of the range
/// is running) and, with the START applied before the call can free
/// anything, `read_retry` catches a registration that overlapped it.
pub struct FeedMm {
    subs: Subscriptions,
    feed: Arc<Feed>,
    /// Reads 0 in a forked child, which the feed does not see.
    sentinel: SharedWords,
    /// Records applied so far (every pair they opened is closed), or
    /// [`UNTRUSTED`] once a record said the feed cannot be trusted.
    consumed: AtomicU64,
    /// Held while records are applied: one applier at a time, in order.
    drain: Mutex<()>,
    stats: FeedStats,
}

impl FeedMm {
    /// Attaches the feed (see [`Feed::attach`]) and checks it with a canary:
    /// an munmap of a fresh page must produce its START and END records.
    ///
    /// # Errors
    /// [`FeedError`]: what the machine refused, or [`FeedError::Canary`].
    pub fn new() -> Result<FeedMm, FeedError> {
        Self::with_feed(Feed::attach()?)
    }

    /// An address space over `feed` (from [`Feed::connect`] or
    /// [`Feed::load`], to choose the way), checked with the canary.
    ///
    /// # Errors
    /// [`FeedError::Canary`], or the fork sentinel could not be mapped.
    pub fn with_feed(feed: Arc<Feed>) -> Result<FeedMm, FeedError> {
        let mm = FeedMm {
            subs: Subscriptions::new(),
            consumed: AtomicU64::new(feed.head()),
            feed,
            sentinel: SharedWords::fork_sentinel().map_err(FeedError::Map)?,
            drain: Mutex::new(()),
            stats: FeedStats::default(),
        };
        mm.canary()?;
        Ok(mm)
    }

    /// The address space's subscriptions: insert interval notifiers here.
    pub fn subscriptions(&self) -> &SubscriptionsRef {
        &self.subs
    }

    /// The feed.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// Where the feed's programs run.
    pub fn attach_point(&self) -> AttachPoint {
        self.feed.attach_point()
    }

    /// What was done so far.
    pub fn stats(&self) -> &FeedStats {
        &self.stats
    }

    /// Applies every record published so far: each START's
    /// `invalidate_range_start`, then, once its thread's END arrived, its
    /// `invalidate_range_end`. Returns when no change seen is in flight.
    /// One acquire load when nothing changed.
    ///
    /// Called from a notifier callback that this flush runs (the same
    /// thread, further up the stack), it returns at once: the records are
    /// being applied there, and waiting would wait for itself.
    ///
    /// # Errors
    /// [`FeedError::Forked`] in a child forked after the feed was set up:
    /// the programs record the parent's calls, not the child's, so nothing
    /// looked up through this address space may be trusted there.
    /// [`FeedError::Unpaired`] from the first flush that saw an io_uring
    /// MADVISE whose end the kernel does not report, on: the change was
    /// invalidated, but when its pages are gone cannot be known.
    #[inline]
    pub fn flush(&self) -> Result<(), FeedError> {
        if self.forked() {
            return Err(FeedError::Forked);
        }
        if self.feed.head() != self.consumed.load(Ordering::Acquire) {
            return self.drain();
        }
        Ok(())
    }

    /// Whether this is a child forked after the feed was set up.
    #[inline]
    fn forked(&self) -> bool {
        self.sentinel.words()[0].load(Ordering::Relaxed) == 0
    }

    #[cold]
    fn drain(&self) -> Result<(), FeedError> {
        let me = self as *const FeedMm as usize;
        if DRAINING.with(|d| d.get() == me) {
            return Ok(());
        }
        let _one = self.drain.lock().unwrap_or_else(PoisonError::into_inner);
        DRAINING.with(|d| d.set(me));
        let _reset = Reset;
        let ring = self.feed.ring();
        let mut next = self.consumed.load(Ordering::Relaxed);
        if next == UNTRUSTED {
            return Err(FeedError::Unpaired);
        }
        if ring.head() == next {
            return Ok(()); // another thread applied them
        }
        self.stats.drains.fetch_add(1, Ordering::Relaxed);
        // Pairs whose END has not arrived, with the thread (or io_uring
        // request token) that owns them.
        let mut open: Vec<(u32, ActiveInvalidation<'_>)> = Vec::new();
        let mut untrusted = false;
        let mut round = 0;
        loop {
            if next == ring.head() {
                if open.is_empty() {
                    break;
                }
                // A call is still inside the kernel: its END is coming.
                relax(&mut round);
                continue;
            }
            match ring.read(next) {
                Slot::NotYet => relax(&mut round),
                Slot::Lost => next = self.overrun(&mut open),
                Slot::Ready(rec) => {
                    round = 0;
                    next += 1;
                    match rec.kind {
                        Kind::Start { start, end, event } => {
                            if let Ok(r) = Range::new(start, end, event) {
                                self.stats.starts.fetch_add(1, Ordering::Relaxed);
                                open.push((rec.tid, self.subs.invalidate_range_start(r)));
                            }
                        }
                        Kind::Unpaired { start, end } => {
                            // Invalidate it now; but it may still be running
                            // after any wait, so nothing later is exact.
                            if let Ok(r) = Range::new(start, end, Event::Clear) {
                                self.stats.starts.fetch_add(1, Ordering::Relaxed);
                                self.subs.invalidate_range_start(r).end();
                            }
                            untrusted = true;
                        }
                        Kind::End => {
                            self.stats.ends.fetch_add(1, Ordering::Relaxed);
                            // Close this owner's pairs (its thread, or its io_uring
                            // request's token), last opened first.
                            let mut i = open.len();
                            while i > 0 {
                                i -= 1;
                                if open[i].0 == rec.tid {
                                    open.remove(i).1.end();
                                }
                            }
                        }
                    }
                }
            }
        }
        if untrusted {
            self.consumed.store(UNTRUSTED, Ordering::Release);
            tracing::error!("mmfeed: {}", FeedError::Unpaired);
            return Err(FeedError::Unpaired);
        }
        self.consumed.store(next, Ordering::Release);
        Ok(())
    }

    /// The reader fell a whole feed behind: records are lost, so which
    /// ranges changed and which calls are in flight is unknown. Close the
    /// open pairs, wait until no call of this process that published a
    /// START is still inside the kernel (each claimed its record before the
    /// head read here), and invalidate everything. Returns where to go on.
    fn overrun(&self, open: &mut Vec<(u32, ActiveInvalidation<'_>)>) -> u64 {
        let ring = self.feed.ring();
        for (_, pair) in open.drain(..).rev() {
            pair.end();
        }
        let head = ring.head();
        let mut round = 0;
        while ring.inflight() != 0 {
            relax(&mut round);
        }
        let all = Range::new(0, END_OF_ADDRESS_SPACE, Event::Unmap).expect("a valid range");
        self.subs.invalidate_range_start(all).end();
        self.stats.overruns.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "mmfeed: the reader fell more than {} records behind; everything was invalidated",
            crate::SLOTS
        );
        head
    }

    /// Unmaps a fresh page and checks that its START was seen (and,
    /// through the flush, its END).
    fn canary(&self) -> Result<(), FeedError> {
        let page = rustix::param::page_size() as u64;
        let from = self.feed.head();
        let addr = crate::sys::canary_munmap(page as usize).map_err(FeedError::CanaryMap)?;
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let to = self.feed.head();
        let seen = (from..to).any(|i| {
            self.feed.record(i).is_some_and(|r| {
                r.tid == tid
                    && r.kind
                        == Kind::Start {
                            start: addr,
                            end: addr + page,
                            event: Event::Unmap,
                        }
            })
        });
        self.flush()?;
        if seen {
            Ok(())
        } else {
            Err(FeedError::Canary)
        }
    }
}

impl std::fmt::Debug for FeedMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedMm")
            .field("feed", &self.feed)
            .field("consumed", &self.consumed.load(Ordering::Relaxed))
            .finish()
    }
}

impl regcache::AddressSpace for FeedMm {
    /// The feed sees every call of the process: nothing to set up per range.
    type Watch = ();
    type Error = FeedError;

    fn subscriptions(&self) -> &SubscriptionsRef {
        &self.subs
    }

    fn watch(&self, _start: u64, _len: u64) -> Result<(), Self::Error> {
        Ok(())
    }

    fn flush(&self) -> Result<(), Self::Error> {
        FeedMm::flush(self)
    }
}
