//! The per-address-space object and the hooks the primary MMU calls
//! (Linux `struct mmu_notifier_subscriptions` and the `__mmu_notifier_*`
//! functions).
//!
//! # Locking, in a few lines
//!
//! * The notifier list is an immutable snapshot replaced under a mutex
//!   (`list`); hooks read it without locks inside an SRCU read-side section.
//!   The mutex is never held across a callback.
//! * Unregister, put and exit publish a list without the notifier, then wait
//!   for (or defer to) a grace period: after that no callback of it runs.
//! * Registration cannot split a start/end pair because `end` only calls
//!   notifiers that were in the list its `start` walked (entry versions);
//!   no lock is shared between invalidations and registration.
//! * The mmap lock (`mmap_write`/`mmap_read`) is the primary's; the
//!   subsystem takes it for writing in `register`/`get`, exactly as Linux.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicU64 as StdAtomicU64;
use std::sync::Arc;

use crate::debug::{DiagHandle, Diagnostics, InvalidateSection, NonBlockSection, Warning};
use crate::interval::IntervalState;
use crate::list::{Entry, NotifierList, Snapshot};
use crate::notifier::{Again, Callbacks, Pte};
use crate::range::Range;
use crate::srcu;
use crate::sync::{self, AtomicBool, Ordering, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Source of unique address-space keys (not part of any concurrency argument,
/// hence a plain std atomic even under loom).
static NEXT_KEY: StdAtomicU64 = StdAtomicU64::new(1);

pub(crate) struct Inner {
    pub(crate) key: u64,
    /// Linux `mm_has_notifiers`: set at the first registration, never cleared.
    pub(crate) has_notifiers: AtomicBool,
    /// False once `release` (exit) started. Changed under the list mutex.
    pub(crate) live: AtomicBool,
    pub(crate) mmap: RwLock<()>,
    pub(crate) list: NotifierList,
    /// Interval notifiers: tree, sequence and deferred list.
    pub(crate) interval: IntervalState,
    pub(crate) diag: DiagHandle,
}

/// The subscriptions of one address space: what a primary MMU embeds and
/// calls its hooks on. A cheap handle; clones refer to the same address space.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use mmu_notifier::{Again, Callbacks, Event, MmuNotifier, Range, Subscriptions};
///
/// struct Shadow { zapped: AtomicUsize }
/// impl MmuNotifier for Shadow {
///     fn callbacks(&self) -> Callbacks { Callbacks::INVALIDATE_RANGE_START }
///     fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
///         self.zapped.fetch_add((r.len() / 4096) as usize, Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let shadow = Arc::new(Shadow { zapped: AtomicUsize::new(0) });
/// let handle = mm.register(shadow.clone()).unwrap();
///
/// // The primary MMU, around a munmap of two pages:
/// let inv = mm.invalidate_range_start(Range::new(0x10000, 0x12000, Event::Unmap).unwrap());
/// // ... clear the PTEs, flush the TLB ...
/// inv.end(); // ... then free the pages
///
/// assert_eq!(shadow.zapped.load(Ordering::Relaxed), 2);
/// mm.unregister(&handle).unwrap();
/// ```
#[derive(Clone)]
pub struct Subscriptions {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("key", &self.inner.key)
            .field("has_notifiers", &self.has_notifiers())
            .field("live", &self.is_live())
            .finish()
    }
}

impl Default for Subscriptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Proof that the mmap lock of one address space is held for writing (Linux
/// `mmap_write_lock`): the registration functions that need the lock held
/// take a reference to it, so the lockdep assertion is a type.
#[must_use = "the mmap lock is released when the guard is dropped"]
pub struct MmapWriteGuard<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    pub(crate) key: u64,
}

/// Proof that the mmap lock is held for reading.
#[must_use = "the mmap lock is released when the guard is dropped"]
pub struct MmapReadGuard<'a> {
    _guard: RwLockReadGuard<'a, ()>,
    #[allow(dead_code)] // kept for symmetry and for the interval read side
    pub(crate) key: u64,
}

impl std::fmt::Debug for MmapWriteGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmapWriteGuard(mm {})", self.key)
    }
}

impl std::fmt::Debug for MmapReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmapReadGuard(mm {})", self.key)
    }
}

/// An invalidation between `invalidate_range_start` and `end`.
///
/// Returned by the start hooks; [`end`](ActiveInvalidation::end) (or dropping
/// it) runs `invalidate_range_end` with the same range and the blockable flag
/// the start set. Not `Send`: start and end run on one thread, as in Linux.
#[must_use = "dropping it ends the invalidation at once; keep it until the PTEs are changed"]
pub struct ActiveInvalidation<'a> {
    mm: &'a Subscriptions,
    range: Range,
    /// List version the start walked; 0 when there were no notifiers.
    version: u64,
    /// The start ran the interval phase, so end must run the interval end.
    /// Recorded rather than re-read, so interval mode being enabled between
    /// start and end cannot unbalance the count.
    interval: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl std::fmt::Debug for ActiveInvalidation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveInvalidation")
            .field("range", &self.range)
            .field("version", &self.version)
            .finish()
    }
}

impl ActiveInvalidation<'_> {
    /// The range being invalidated, with its blockable flag.
    pub fn range(&self) -> &Range {
        &self.range
    }

    /// Runs `invalidate_range_end` (Linux `mmu_notifier_invalidate_range_end`).
    #[inline]
    pub fn end(self) {
        drop(self);
    }
}

impl Drop for ActiveInvalidation<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.range.blockable() {
            crate::debug::might_sleep();
        }
        if self.interval {
            self.mm.inner.interval.end();
        }
        if self.version != 0 {
            self.mm.end_list(&self.range, self.version);
        }
    }
}

impl Subscriptions {
    /// A new, live address space with no subscribers.
    pub fn new() -> Subscriptions {
        let key = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Subscriptions {
            inner: Arc::new(Inner {
                key,
                has_notifiers: AtomicBool::new(false),
                live: AtomicBool::new(true),
                mmap: RwLock::new(()),
                list: NotifierList::new(key),
                interval: IntervalState::new(),
                diag: Arc::new(Diagnostics::default()),
            }),
        }
    }

    /// Unique identity of this address space (stable for its lifetime).
    pub fn id(&self) -> u64 {
        self.inner.key
    }

    /// Whether anyone ever subscribed (Linux `mm_has_notifiers`; never reset).
    /// One load: the hooks' fast path when nobody subscribed.
    #[inline]
    pub fn has_notifiers(&self) -> bool {
        self.inner.has_notifiers.load(Ordering::Acquire)
    }

    /// Whether the address space is live, i.e. `release` (exit) has not run.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// The diagnostic counters of this address space.
    pub fn diagnostics(&self) -> &Diagnostics {
        &self.inner.diag
    }

    /// Takes the mmap lock for writing. May sleep.
    pub fn mmap_write(&self) -> MmapWriteGuard<'_> {
        crate::debug::might_sleep();
        MmapWriteGuard {
            _guard: sync::write(&self.inner.mmap),
            key: self.inner.key,
        }
    }

    /// Takes the mmap lock for reading. May sleep.
    pub fn mmap_read(&self) -> MmapReadGuard<'_> {
        crate::debug::might_sleep();
        MmapReadGuard {
            _guard: sync::read(&self.inner.mmap),
            key: self.inner.key,
        }
    }

    /// Number of notifiers on the list now.
    pub fn notifier_count(&self) -> usize {
        self.inner.list.current().entries.len()
    }

    // ---------------------------------------------------------------------
    // Invalidation hooks
    // ---------------------------------------------------------------------

    /// Announces that PTEs in `range` are about to change (Linux
    /// `mmu_notifier_invalidate_range_start`). Callbacks may sleep. Keep the
    /// returned value until the PTEs are changed, then call
    /// [`ActiveInvalidation::end`].
    ///
    /// A start failure here is a notifier bug: it is reported
    /// ([`Warning::BlockableStartFailed`]), every end callback is called, and,
    /// as in Linux, the failure is otherwise ignored.
    #[inline]
    pub fn invalidate_range_start(&self, mut range: Range) -> ActiveInvalidation<'_> {
        crate::debug::might_sleep();
        range.set_blockable(true);
        let (interval, version) = if self.has_notifiers() {
            match self.start_all(&range) {
                Ok(walked) | Err((walked, Again)) => walked,
            }
        } else {
            (false, 0)
        };
        ActiveInvalidation {
            mm: self,
            range,
            version,
            interval,
            _not_send: std::marker::PhantomData,
        }
    }

    /// Non-blockable start (Linux `mmu_notifier_invalidate_range_start_nonblock`,
    /// used by the OOM reaper). Callbacks must not sleep.
    ///
    /// # Errors
    /// [`Again`] when a notifier could not proceed without sleeping. Every
    /// notifier's end callback has then already been called: the caller must
    /// leave the PTEs alone and has no end to call.
    #[inline]
    pub fn invalidate_range_start_nonblock(
        &self,
        mut range: Range,
    ) -> Result<ActiveInvalidation<'_>, Again> {
        range.set_blockable(false);
        let (interval, version) = if self.has_notifiers() {
            self.start_all(&range).map_err(|(_, e)| e)?
        } else {
            (false, 0)
        };
        Ok(ActiveInvalidation {
            mm: self,
            range,
            version,
            interval,
            _not_send: std::marker::PhantomData,
        })
    }

    /// Both phases of start, interval first (Linux
    /// `__mmu_notifier_invalidate_range_start`). Returns whether the interval
    /// phase ran and the list version walked. On failure (non-blockable
    /// ranges only) nothing remains to be ended: a failed interval phase has
    /// ended itself and no list notifier was called; a failed list phase has
    /// called every end, and the interval phase is ended here too.
    ///
    /// Divergence from Linux: Linux returns without undoing the
    /// interval phase when the list phase fails, leaking
    /// `active_invalidate_ranges` (readers and removers of overlapping
    /// interval notifiers then wait forever). We end it.
    #[inline(never)]
    fn start_all(&self, range: &Range) -> Result<(bool, u64), ((bool, u64), Again)> {
        let interval = self.inner.interval.enabled();
        if interval && self.inner.interval.start(self, range).is_err() {
            return Err(((false, 0), Again));
        }
        match self.start_list(range) {
            Ok(v) => Ok((interval, v)),
            Err((v, Again)) if range.blockable() => Err(((interval, v), Again)),
            Err((_, Again)) => {
                if interval {
                    self.inner.interval.end();
                }
                Err(((false, 0), Again))
            }
        }
    }

    /// The list phase of start. Returns the list version walked, and on
    /// failure the error after every end callback has run.
    #[inline]
    fn start_list(&self, range: &Range) -> Result<u64, (u64, Again)> {
        let _srcu = srcu::read_lock();
        let _section = InvalidateSection::enter(self.inner.key, &self.inner.diag);
        // The walk is a separate function so that the thread-local cache
        // lookup around it stays small enough to be inlined here.
        self.inner.list.with(|snap| self.start_walk(snap, range))
    }

    #[inline(never)]
    fn start_walk(&self, snap: &Snapshot, range: &Range) -> Result<u64, (u64, Again)> {
        let mut failed = false;
        let blockable = range.blockable();
        self.for_each_caught(snap, "invalidate_range_start", |e| {
            if e.callbacks.contains(Callbacks::INVALIDATE_RANGE_START) {
                let r = {
                    let _nb = NonBlockSection::enter(&self.inner.diag, !blockable);
                    e.ops.invalidate_range_start(range)
                };
                if r.is_err() {
                    self.start_failed(e, blockable);
                    failed = true;
                }
            }
            true
        });
        if failed {
            // c2655835: every notifier with an end gets it, including the
            // ones whose start succeeded. No non-block marking here (Linux).
            self.for_each_caught(snap, "invalidate_range_end", |e| {
                if e.callbacks.contains(Callbacks::INVALIDATE_RANGE_END) {
                    e.ops.invalidate_range_end(range);
                }
                true
            });
            Err((snap.version, Again))
        } else {
            Ok(snap.version)
        }
    }

    fn start_failed(&self, e: &Entry, blockable: bool) {
        let diag = &self.inner.diag;
        tracing::info!(
            blockable,
            "mmu_notifier: invalidate_range_start failed with EAGAIN"
        );
        if blockable {
            diag.report(
                Warning::BlockableStartFailed,
                "invalidate_range_start failed in a blockable range",
            );
        }
        if e.callbacks.contains(Callbacks::INVALIDATE_RANGE_END) {
            diag.report(
                Warning::FailingStartHasEnd,
                "a notifier that failed invalidate_range_start has invalidate_range_end",
            );
        }
        if !e.callbacks.contains(Callbacks::START_MAY_FAIL) {
            diag.report(
                Warning::UndeclaredStartFailure,
                "invalidate_range_start failed without declaring START_MAY_FAIL",
            );
        }
    }

    /// The list phase of end: notifiers that were in the list walked by the
    /// start (entry version <= `version`) and are still on it.
    #[inline(never)]
    fn end_list(&self, range: &Range, version: u64) {
        let _srcu = srcu::read_lock();
        let _section = InvalidateSection::enter(self.inner.key, &self.inner.diag);
        self.inner
            .list
            .with(|snap| self.end_walk(snap, range, version));
    }

    #[inline(never)]
    fn end_walk(&self, snap: &Snapshot, range: &Range, version: u64) {
        self.for_each_caught(snap, "invalidate_range_end", |e| {
            if e.version <= version && e.callbacks.contains(Callbacks::INVALIDATE_RANGE_END) {
                let _nb = NonBlockSection::enter(&self.inner.diag, !range.blockable());
                e.ops.invalidate_range_end(range);
            }
            true
        });
    }

    /// Calls `f` on every entry in list order until it returns false. A panic
    /// in `f` (a callback) is caught and reported, and the walk continues
    /// with the next entry. One unwind guard per walk, not per callback.
    pub(crate) fn for_each_caught(
        &self,
        snap: &Snapshot,
        what: &'static str,
        mut f: impl FnMut(&Entry) -> bool,
    ) {
        let entries = &snap.entries[..];
        let mut i = 0;
        while i < entries.len() {
            let walked = catch_unwind(AssertUnwindSafe(|| {
                while i < entries.len() {
                    if !f(&entries[i]) {
                        return true;
                    }
                    i += 1;
                }
                true
            }));
            match walked {
                Ok(_) => break,
                Err(_) => {
                    self.inner.diag.report(
                        Warning::CallbackPanicked,
                        &format!("{what} callback panicked"),
                    );
                    i += 1;
                }
            }
        }
    }

    /// Walks the list in an atomic-context callback section (the primary
    /// holds its page-table lock in Linux): no sleeping allowed.
    #[inline]
    fn walk_atomic(&self, what: &'static str, f: impl FnMut(&Entry) -> bool) {
        let _srcu = srcu::read_lock();
        let _nb = NonBlockSection::enter(&self.inner.diag, true);
        self.inner
            .list
            .with(|snap| self.for_each_caught(snap, what, f));
    }

    // ---------------------------------------------------------------------
    // Aging, change_pte and secondary-TLB hooks
    // ---------------------------------------------------------------------

    /// Secondary side of `ptep_clear_flush_young_notify`: ORs
    /// `clear_flush_young` over every notifier (all are called).
    pub fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        let mut young = false;
        if self.has_notifiers() {
            self.walk_atomic("clear_flush_young", |e| {
                if e.callbacks.contains(Callbacks::CLEAR_FLUSH_YOUNG) {
                    young |= e.ops.clear_flush_young(self, start, end);
                }
                true
            });
        }
        young
    }

    /// ORs `clear_young` over every notifier (all are called).
    pub fn clear_young(&self, start: u64, end: u64) -> bool {
        let mut young = false;
        if self.has_notifiers() {
            self.walk_atomic("clear_young", |e| {
                if e.callbacks.contains(Callbacks::CLEAR_YOUNG) {
                    young |= e.ops.clear_young(self, start, end);
                }
                true
            });
        }
        young
    }

    /// `test_young`: the first notifier (newest first) reporting young wins
    /// and the rest are not called.
    pub fn test_young(&self, address: u64) -> bool {
        let mut young = false;
        if self.has_notifiers() {
            self.walk_atomic("test_young", |e| {
                if e.callbacks.contains(Callbacks::TEST_YOUNG) {
                    young = e.ops.test_young(self, address);
                }
                !young
            });
        }
        young
    }

    /// Tells every notifier the PTE at `address` is about to become `pte`
    /// (Linux `set_pte_at_notify` calls this before writing the PTE, inside a
    /// start/end pair).
    pub fn change_pte(&self, address: u64, pte: Pte) {
        if self.has_notifiers() {
            self.walk_atomic("change_pte", |e| {
                if e.callbacks.contains(Callbacks::CHANGE_PTE) {
                    e.ops.change_pte(self, address, pte);
                }
                true
            });
        }
    }

    /// Called by the primary's TLB flush for `[start, end)` (`end` may be
    /// `u64::MAX`: everything). Drives `arch_invalidate_secondary_tlbs`; no
    /// interval notifier is involved.
    pub fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        if self.has_notifiers() {
            self.walk_atomic("arch_invalidate_secondary_tlbs", |e| {
                if e.callbacks
                    .contains(Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS)
                {
                    e.ops.arch_invalidate_secondary_tlbs(self, start, end);
                }
                true
            });
        }
    }
}
