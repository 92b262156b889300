//! The per-address-space object and the hooks the primary MMU calls
//! (Linux `struct mmu_notifier_subscriptions` and the `__mmu_notifier_*`
//! functions).
//!
//! # Locking, in a few lines
//!
//! * The notifier list is an immutable snapshot behind an RCU pointer,
//!   replaced under a writer lock (`list`); hooks dereference it without
//!   locks inside an SRCU read-side section of the address space's
//!   [`Domain`]. The writer lock is never held across a callback.
//! * Unregister, put and exit publish a list without the notifier, then wait
//!   for (or defer to) a grace period: after that no callback of it runs.
//! * An invalidation holds one read-side section from `start` to `end` and
//!   walks the same snapshot in both: registration cannot split a start/end
//!   pair, and unregister (which waits for a grace period) returns only
//!   after the pairs in flight have ended. No lock is shared between
//!   invalidations and registration.
//! * The mmap lock (`mmap_write`/`mmap_read`) is the primary's; the
//!   subsystem takes it for writing in `register`/`get`, exactly as Linux.

use alloc::sync::Arc;
use core::borrow::Borrow;
use core::sync::atomic::AtomicU64 as PlainU64;

use crate::debug::{DiagHandle, Diagnostics, InvalidateSection, NonBlockSection, Warning};
use crate::error::Error;
use crate::interval::{IntervalNotifier, IntervalOps, IntervalState};
use crate::list::{Linked, NotifierList, Snapshot};
use crate::notifier::{Again, Callbacks, PteValue};
use crate::range::Range;
use crate::rcu::{Anchored, RcuRef};
use crate::srcu::Domain;
use crate::sync::{
    self, AtomicBool, AtomicU32, Ordering, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

/// Source of unique address-space keys (not part of any concurrency argument,
/// hence a plain std atomic even under loom).
static NEXT_KEY: PlainU64 = PlainU64::new(1);

/// The bits of [`SubscriptionsState::mode`].
pub(crate) struct Mode;

impl Mode {
    /// Linux `mm_has_notifiers`: anyone ever subscribed.
    pub(crate) const HAS_NOTIFIERS: u32 = 1;
    /// Linux `has_itree`: interval mode is on (implies `HAS_NOTIFIERS`).
    pub(crate) const HAS_ITREE: u32 = 2;
}

pub(crate) struct SubscriptionsState {
    pub(crate) key: u64,
    /// The SRCU domain callbacks run under and the list is protected by.
    pub(crate) domain: &'static Domain,
    /// Linux `mm_has_notifiers` and `has_itree` in one word ([`Mode`]): set
    /// at the first registration or interval insert, never cleared; the
    /// hooks' fast path is one load of it.
    pub(crate) mode: AtomicU32,
    /// False once `release` (exit) started. Changed under the list mutex.
    pub(crate) live: AtomicBool,
    pub(crate) mmap: RwLock<()>,
    pub(crate) list: NotifierList,
    /// Interval notifiers: tree, sequence and deferred list.
    pub(crate) interval: IntervalState,
    pub(crate) diag: DiagHandle,
}

/// The subscriptions of one address space: what a primary MMU embeds and
/// calls its hooks on (Linux's `mm->notifier_subscriptions`, reached only
/// by core mm through the `mmu_notifier_*` wrappers).
///
/// The primary's handle: not `Clone`, and the only type with the hooks
/// (`invalidate_range_start` and its kin, the young callbacks,
/// `change_pte`, `arch_invalidate_secondary_tlbs`, `release`). What a
/// secondary MMU keeps is a [`SubscriptionsRef`] ([`handle`](Self::handle)),
/// which registers, unregisters and inserts interval notifiers but cannot
/// announce an invalidation or run exit. It dereferences to one, so the
/// primary registers through it too, as Linux's core mm may.
///
/// `release` takes `&self`, not `self`: as in Linux, exit releases the
/// notifiers *before* it unmaps, and the unmapping still runs the
/// invalidation hooks (interval notifiers get them), so the handle outlives
/// its release. Running it twice is refused at run time
/// ([`Error::AlreadyReleased`](crate::Error::AlreadyReleased)).
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
pub struct Subscriptions {
    shared: SubscriptionsRef,
}

impl core::ops::Deref for Subscriptions {
    type Target = SubscriptionsRef;
    #[inline(always)]
    fn deref(&self) -> &SubscriptionsRef {
        &self.shared
    }
}

/// What a secondary MMU holds of an address space (Linux: the `mm` a
/// driver keeps after `mmgrab`, through which it registers): register,
/// unregister, `get` / `put`, interval notifiers, the mmap lock, the
/// counters. A cheap handle; clones refer to the same address space. It has
/// none of the primary's hooks: only the [`Subscriptions`] the primary
/// embeds does.
///
/// ```compile_fail
/// use mmu_notifier::{Event, Range, Subscriptions};
/// let mm = Subscriptions::new();
/// let secondary = mm.handle();
/// // A secondary cannot announce an invalidation:
/// secondary.invalidate_range_start(Range::new(0, 0x1000, Event::Unmap).unwrap());
/// ```
#[derive(Clone)]
pub struct SubscriptionsRef {
    pub(crate) inner: Arc<SubscriptionsState>,
}

impl core::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(&self.shared, f)
    }
}

impl core::fmt::Debug for SubscriptionsRef {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("key", &self.inner.key)
            .field("has_notifiers", &self.has_notifiers())
            .field("live", &self.is_live())
            .finish()
    }
}

#[cfg(feature = "std")]
impl Default for Subscriptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The mmap lock of one address space held for writing (Linux
/// `mmap_write_lock`). The registrations a caller makes with the lock
/// already held (Linux's `*_locked` functions) are its methods
/// ([`register`](SubscriptionsRef::register), [`get`](SubscriptionsRef::get),
/// [`interval_insert`](SubscriptionsRef::interval_insert)): the lock is the receiver,
/// so it cannot be forgotten, nor be another address space's.
#[must_use = "the mmap lock is released when the guard is dropped"]
pub struct MmapWriteGuard<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    pub(crate) mm: &'a SubscriptionsRef,
}

/// Proof that the mmap lock is held for reading.
#[must_use = "the mmap lock is released when the guard is dropped"]
pub struct MmapReadGuard<'a> {
    _guard: RwLockReadGuard<'a, ()>,
    #[allow(dead_code)] // kept for symmetry and for the interval read side
    pub(crate) key: u64,
}

impl core::fmt::Debug for MmapWriteGuard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MmapWriteGuard(mm {})", self.mm.inner.key)
    }
}

impl core::fmt::Debug for MmapReadGuard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MmapReadGuard(mm {})", self.key)
    }
}

/// An invalidation between `invalidate_range_start` and `end`.
///
/// Returned by the start hooks; [`end`](ActiveInvalidation::end) (or dropping
/// it) runs `invalidate_range_end` with the same range and the blockable flag
/// the start set. Not `Send`: start and end run on one thread, as in Linux.
///
/// `R` is how it holds the range: by value (`Range`, from
/// [`Subscriptions::invalidate_range_start`]) or borrowed from the caller
/// (`&Range`, from [`Subscriptions::invalidate_range_start_in`], Linux's
/// shape: the caller keeps its `mmu_notifier_range` and the guard is two
/// words smaller, which the hook pair pays for on every call).
#[must_use = "dropping it ends the invalidation at once; keep it until the PTEs are changed"]
pub struct ActiveInvalidation<'a, R: Borrow<Range> = Range> {
    mm: &'a Subscriptions,
    range: R,
    /// The snapshot the start walked, and the read-side section it was
    /// walked in, both held until the end (Linux takes a second section
    /// for the end and re-reads the list). `None`: the list phase did not
    /// run (no notifiers, or a failure that already ended everything).
    list: Option<RcuRef<'a, Snapshot>>,
    /// The start ran the interval phase, so end must run the interval end.
    /// Recorded rather than re-read, so interval mode being enabled between
    /// start and end cannot unbalance the count. A whole word, like the
    /// fields of [`Range`], so moving the guard costs no store-forwarding
    /// stall.
    interval: usize,
    _not_send: core::marker::PhantomData<*const ()>,
}

impl<R: Borrow<Range>> core::fmt::Debug for ActiveInvalidation<'_, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ActiveInvalidation")
            .field("range", self.range.borrow())
            .field("list_phase", &self.list.is_some())
            .finish()
    }
}

impl<R: Borrow<Range>> ActiveInvalidation<'_, R> {
    /// The range being invalidated, with its blockable flag.
    pub fn range(&self) -> &Range {
        self.range.borrow()
    }

    /// Runs `invalidate_range_end` (Linux `mmu_notifier_invalidate_range_end`).
    #[inline(always)]
    pub fn end(self) {}
}

impl<R: Borrow<Range>> Drop for ActiveInvalidation<'_, R> {
    /// Both phases of end, interval first (Linux
    /// `mmu_notifier_invalidate_range_end`); the walk is out of line and the
    /// section closes inline.
    #[inline]
    fn drop(&mut self) {
        let range = self.range.borrow();
        if range.blockable() {
            crate::debug::might_sleep();
        }
        if self.interval != 0 {
            self.mm.inner.interval.end();
        }
        if let Some(list) = &self.list {
            self.mm.end_walk(list, range);
        }
        // The section closes when `list` is dropped, right after this.
    }
}

impl<'a, R: Borrow<Range>> ActiveInvalidation<'a, R> {
    /// The invalidation of an address space nobody subscribed to.
    #[inline(always)]
    fn idle(mm: &'a Subscriptions, range: R) -> Self {
        ActiveInvalidation {
            mm,
            range,
            list: None,
            interval: 0,
            _not_send: core::marker::PhantomData,
        }
    }
}

impl Subscriptions {
    /// A new, live address space with no subscribers, under the std build's
    /// process-wide SRCU domain ([`Domain::global`]).
    #[cfg(feature = "std")]
    pub fn new() -> Subscriptions {
        Subscriptions::with_domain(Domain::global())
    }

    /// A new, live address space with no subscribers whose callbacks run
    /// under `domain` (an embedding without std creates its domain with
    /// [`Domain::with_backend`]).
    pub fn with_domain(domain: &'static Domain) -> Subscriptions {
        let key = NEXT_KEY.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let diag: DiagHandle = Arc::new(Diagnostics::default());
        Subscriptions {
            shared: SubscriptionsRef {
                inner: Arc::new(SubscriptionsState {
                    key,
                    domain,
                    mode: AtomicU32::new(0),
                    live: AtomicBool::new(true),
                    mmap: RwLock::new(()),
                    list: NotifierList::new(domain),
                    interval: IntervalState::new(domain, key, diag.clone()),
                    diag,
                }),
            },
        }
    }

    /// The handle a secondary MMU keeps: it registers and inserts interval
    /// notifiers, and has none of the hooks.
    pub fn handle(&self) -> SubscriptionsRef {
        self.shared.clone()
    }
}

impl SubscriptionsRef {
    /// The SRCU domain this address space's callbacks run under.
    pub fn domain(&self) -> &'static Domain {
        self.inner.domain
    }

    /// Unique identity of this address space (stable for its lifetime).
    pub fn id(&self) -> u64 {
        self.inner.key
    }

    /// Whether anyone ever subscribed (Linux `mm_has_notifiers`; never reset).
    /// One load: the hooks' fast path when nobody subscribed.
    #[inline]
    pub fn has_notifiers(&self) -> bool {
        self.inner.mode.load(Ordering::Acquire) & Mode::HAS_NOTIFIERS != 0
    }

    /// Whether interval mode is on (Linux `has_itree`).
    #[inline]
    pub(crate) fn interval_enabled(&self) -> bool {
        self.inner.mode.load(Ordering::Acquire) & Mode::HAS_ITREE != 0
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
            mm: self,
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
        self.inner.list.len()
    }
}

impl Subscriptions {
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
    ///
    /// The pair holds one SRCU read-side section from here to its end, and
    /// the end calls exactly the notifiers this start called. Until the end,
    /// on this thread, [`register`](SubscriptionsRef::register), [`get`](SubscriptionsRef::get),
    /// [`unregister`](SubscriptionsRef::unregister), [`release`](Self::release), the
    /// first [`interval_insert`](SubscriptionsRef::interval_insert) and the SRCU waits
    /// return [`Error::WouldDeadlock`](crate::Error::WouldDeadlock); other
    /// threads' unregisters wait for the end.
    #[inline]
    pub fn invalidate_range_start(&self, range: Range) -> ActiveInvalidation<'_> {
        crate::debug::might_sleep();
        // Ranges are built blockable, so this is a test and no store: a
        // rewrite of the range just written by the caller would be read back
        // (by the copy into the guard) with a wider load than the stores
        // that wrote it, a store-forwarding stall on every hook.
        let range = if range.blockable() {
            range
        } else {
            range.blockable_as(true)
        };
        self.start_blockable(range)
    }

    /// [`invalidate_range_start`](Self::invalidate_range_start) on a range
    /// the caller keeps, as Linux's callers keep their
    /// `mmu_notifier_range`: the start sets its blockable flag, and the
    /// guard borrows it instead of holding a copy (the cheaper form of the
    /// hook pair).
    ///
    /// ```
    /// use mmu_notifier::{Event, Range, Subscriptions};
    /// let mm = Subscriptions::new();
    /// let mut range = Range::new(0x1000, 0x3000, Event::Unmap).unwrap();
    /// let inv = mm.invalidate_range_start_in(&mut range);
    /// // ... clear the PTEs, flush the TLB ...
    /// inv.end();
    /// ```
    #[inline]
    pub fn invalidate_range_start_in<'a>(
        &'a self,
        range: &'a mut Range,
    ) -> ActiveInvalidation<'a, &'a Range> {
        crate::debug::might_sleep();
        if !range.blockable() {
            *range = range.blockable_as(true);
        }
        self.start_blockable(&*range)
    }

    /// The blockable start on a range already marked blockable, held as
    /// `R`.
    #[inline(always)]
    fn start_blockable<R: Borrow<Range>>(&self, range: R) -> ActiveInvalidation<'_, R> {
        let mode = self.inner.mode.load(Ordering::Acquire);
        if mode == 0 {
            // Linux's `mm_has_notifiers` fast path: one load, nothing else.
            return ActiveInvalidation::idle(self, range);
        }
        let interval = mode & Mode::HAS_ITREE != 0;
        if interval {
            // A blockable interval phase cannot fail.
            let _ = self.inner.interval.start(range.borrow());
        }
        // The section is opened inline, so its thread-local counter is
        // reached the way the calling crate reaches thread-locals (one
        // `%fs`-relative access in an executable); the walk is out of line,
        // like Linux's `__mmu_notifier_invalidate_range_start`.
        let list = self.inner.list.enter();
        // A failure of a blockable start is a notifier bug, reported by the
        // walk; the end still runs (Linux ignores the error too).
        let _ = self.start_list(&list, range.borrow());
        ActiveInvalidation {
            mm: self,
            range,
            list: Some(list),
            interval: usize::from(interval),
            _not_send: core::marker::PhantomData,
        }
    }

    /// Non-blockable start (Linux `mmu_notifier_invalidate_range_start_nonblock`,
    /// used by the OOM reaper). Callbacks must not sleep.
    ///
    /// # Errors
    /// [`Again`] when a notifier could not proceed without sleeping. Every
    /// notifier's end callback has then already been called: the caller must
    /// leave the PTEs alone and has no end to call.
    ///
    /// Divergence from Linux: when the list phase fails, Linux returns
    /// without undoing the interval phase, leaking `active_invalidate_ranges`
    /// (readers and removers of overlapping interval notifiers then wait
    /// forever). We end it.
    #[inline]
    pub fn invalidate_range_start_nonblock(
        &self,
        range: Range,
    ) -> Result<ActiveInvalidation<'_>, Again> {
        let range = range.blockable_as(false);
        let mode = self.inner.mode.load(Ordering::Acquire);
        if mode == 0 {
            return Ok(ActiveInvalidation::idle(self, range));
        }
        let interval = mode & Mode::HAS_ITREE != 0;
        // A failed interval phase has ended itself.
        if interval && self.inner.interval.start(&range).is_err() {
            return Err(Again);
        }
        let list = self.inner.list.enter();
        if self.start_list(&list, &range).is_err() {
            // Every end callback has run; end the interval phase too.
            if interval {
                self.inner.interval.end();
            }
            return Err(Again);
        }
        Ok(ActiveInvalidation {
            mm: self,
            range,
            list: Some(list),
            interval: usize::from(interval),
            _not_send: core::marker::PhantomData,
        })
    }

    /// The list phase of start (Linux `mn_hlist_invalidate_range_start`),
    /// inside the section the caller opened: on failure every end callback
    /// has run. A list of one notifier takes its own out-of-line walk (see
    /// [`for_each_caught`](Self::for_each_caught)).
    #[inline(always)]
    fn start_list(&self, snap: &Snapshot, range: &Range) -> Result<(), Again> {
        if snap.starts.len() == 1 {
            self.start_walk::<true>(snap, range)
        } else {
            self.start_walk::<false>(snap, range)
        }
    }

    #[inline(never)]
    fn start_walk<const ONE: bool>(&self, snap: &Snapshot, range: &Range) -> Result<(), Again> {
        let _section = InvalidateSection::enter(self.inner.key, &self.inner.diag);
        let mut failed = false;
        let blockable = range.blockable();
        self.for_each_caught::<ONE>(&snap.starts, "invalidate_range_start", |e| {
            let r = {
                let _nb = NonBlockSection::enter(&self.inner.diag, !blockable);
                e.ops.invalidate_range_start(range)
            };
            if r.is_err() {
                self.start_failed(e, blockable);
                failed = true;
            }
            true
        });
        if failed {
            // c2655835: every notifier with an end gets it, including the
            // ones whose start succeeded. No non-block marking here (Linux).
            self.for_each_caught::<false>(&snap.ends, "invalidate_range_end", |e| {
                e.ops.invalidate_range_end(range);
                true
            });
            Err(Again)
        } else {
            Ok(())
        }
    }

    /// Reports a failed start (out of line: the walk stays small).
    #[cold]
    #[inline(never)]
    fn start_failed(&self, e: &Linked, blockable: bool) {
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

    /// The list phase of end (Linux `mn_hlist_invalidate_end`): the
    /// notifiers of the snapshot the start walked, inside the section the
    /// start opened.
    #[inline(always)]
    fn end_walk(&self, snap: &Snapshot, range: &Range) {
        if snap.ends.len() == 1 {
            self.end_list_walk::<true>(snap, range);
        } else {
            self.end_list_walk::<false>(snap, range);
        }
    }

    #[inline(never)]
    fn end_list_walk<const ONE: bool>(&self, snap: &Snapshot, range: &Range) {
        let _section = InvalidateSection::enter(self.inner.key, &self.inner.diag);
        self.for_each_caught::<ONE>(&snap.ends, "invalidate_range_end", |e| {
            let _nb = NonBlockSection::enter(&self.inner.diag, !range.blockable());
            e.ops.invalidate_range_end(range);
            true
        });
    }

    /// Reports a caught callback panic (out of line: the walk stays small).
    #[cfg(all(feature = "std", panic = "unwind"))]
    #[cold]
    #[inline(never)]
    fn callback_panicked(&self, what: &'static str) {
        self.inner.diag.report(
            Warning::CallbackPanicked,
            &alloc::format!("{what} callback panicked"),
        );
    }

    /// Calls `f` on every entry in list order until it returns false. Where
    /// panics unwind, a panic in `f` (a callback) is caught and reported, and
    /// the walk continues with the next entry. One unwind guard per walk, not
    /// per callback (a guard per callback measured 1.2-1.3x slower with one
    /// and with eight notifiers).
    ///
    /// `ONE`: the caller saw a list of exactly one entry. One notifier per
    /// address space is the common case (a VM's shadow MMU, one device);
    /// its walk needs no resume state, so it gets its own instance, which
    /// keeps fewer registers live (the hook pair measured about 1 ns less).
    /// Correct whatever the length: other lengths take the general walk.
    #[cfg(all(feature = "std", panic = "unwind"))]
    #[inline(always)]
    pub(crate) fn for_each_caught<const ONE: bool>(
        &self,
        entries: &[Linked],
        what: &'static str,
        mut f: impl FnMut(&Linked) -> bool,
    ) {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        if ONE {
            if let [only] = entries {
                if catch_unwind(AssertUnwindSafe(|| f(only))).is_err() {
                    self.callback_panicked(what);
                }
                return;
            }
        }
        let mut from = 0;
        // The entry being called, for resuming after a panic. The loop only
        // stores it (the index itself stays in a register): a loop that
        // reloaded it from memory would wait for the store on every entry.
        let mut at = 0;
        while from < entries.len() {
            let walked = catch_unwind(AssertUnwindSafe(|| {
                for (i, e) in entries.iter().enumerate().skip(from) {
                    at = i;
                    if !f(e) {
                        return;
                    }
                }
            }));
            match walked {
                Ok(()) => break,
                Err(_) => {
                    self.callback_panicked(what);
                    from = at + 1;
                }
            }
        }
    }

    /// Calls `f` on every entry in list order until it returns false (no
    /// unwinding here: a panic aborts, so there is nothing to contain).
    #[cfg(not(all(feature = "std", panic = "unwind")))]
    pub(crate) fn for_each_caught<const ONE: bool>(
        &self,
        entries: &[Linked],
        _what: &'static str,
        mut f: impl FnMut(&Linked) -> bool,
    ) {
        for e in entries {
            if !f(e) {
                break;
            }
        }
    }

    /// Walks the list in an atomic-context callback section (the primary
    /// holds its page-table lock in Linux): no sleeping allowed.
    #[inline]
    fn walk_atomic(&self, what: &'static str, f: impl FnMut(&Linked) -> bool) {
        let list = self.inner.list.enter();
        let _nb = NonBlockSection::enter(&self.inner.diag, true);
        self.for_each_caught::<false>(&list.entries, what, f);
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
                    young |= e.ops.clear_flush_young(start, end);
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
                    young |= e.ops.clear_young(start, end);
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
                    young = e.ops.test_young(address);
                }
                !young
            });
        }
        young
    }

    /// Tells every notifier the PTE at `address` is about to become `pte`
    /// (Linux `set_pte_at_notify` calls this before writing the PTE, inside a
    /// start/end pair).
    pub fn change_pte(&self, address: u64, pte: PteValue) {
        if self.has_notifiers() {
            self.walk_atomic("change_pte", |e| {
                if e.callbacks.contains(Callbacks::CHANGE_PTE) {
                    e.ops.change_pte(address, pte);
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
                    e.ops.arch_invalidate_secondary_tlbs(start, end);
                }
                true
            });
        }
    }
}

// The interval-notifier API of an address space (the tree itself, its
// sequence and its walks live in `interval.rs`).

impl MmapWriteGuard<'_> {
    /// [`SubscriptionsRef::interval_insert`] with the mmap write lock held
    /// (Linux `mmu_interval_notifier_insert_locked`).
    ///
    /// # Errors
    /// As [`SubscriptionsRef::interval_insert`].
    pub fn interval_insert(
        &self,
        start: u64,
        length: u64,
        ops: Arc<dyn IntervalOps>,
    ) -> Result<IntervalNotifier, Error> {
        self.mm.interval_insert_under(self, start, length, ops)
    }
}

impl SubscriptionsRef {
    /// Inserts an interval notifier for `[start, start + length)` (Linux
    /// `mmu_interval_notifier_insert`). Takes the mmap write lock the first
    /// time interval mode is enabled on this address space.
    ///
    /// On return the notifier may not be in the tree yet (it was inserted
    /// while an invalidation was running): populate secondary mappings only
    /// through [`IntervalNotifier::read_begin`] /
    /// [`read_retry`](IntervalNotifier::read_retry), which cope with that.
    ///
    /// # Errors
    /// [`Error::InvalidInterval`] if `length` is 0 or the end overflows,
    /// [`Error::AddressSpaceExited`] once exit started (seed c9682d10: the
    /// check is on liveness, not on the object still existing), and
    /// [`Error::WouldDeadlock`] from a notifier callback.
    pub fn interval_insert(
        &self,
        start: u64,
        length: u64,
        ops: Arc<dyn IntervalOps>,
    ) -> Result<IntervalNotifier, Error> {
        if !self.interval_enabled() {
            // Enabling interval mode takes the mmap write lock.
            self.refuse_in_callback("interval_insert")?;
            return self.mmap_write().interval_insert(start, length, ops);
        }
        self.interval_insert_common(start, length, ops)
    }

    /// The body of [`MmapWriteGuard::interval_insert`], under the guard.
    fn interval_insert_under(
        &self,
        _held: &MmapWriteGuard<'_>,
        start: u64,
        length: u64,
        ops: Arc<dyn IntervalOps>,
    ) -> Result<IntervalNotifier, Error> {
        if self.is_live() {
            // Linux `__mmu_notifier_register(NULL, mm)`.
            self.inner
                .mode
                .fetch_or(Mode::HAS_NOTIFIERS | Mode::HAS_ITREE, Ordering::Release);
        }
        self.interval_insert_common(start, length, ops)
    }

    fn interval_insert_common(
        &self,
        start: u64,
        length: u64,
        ops: Arc<dyn IntervalOps>,
    ) -> Result<IntervalNotifier, Error> {
        if length == 0 {
            return Err(Error::InvalidInterval { start, length });
        }
        let last = start
            .checked_add(length - 1)
            .ok_or(Error::InvalidInterval { start, length })?;
        let held = Anchored::new(self.inner.clone(), |s| &s.interval).erase_owner();
        IntervalState::insert(held, start, last, ops, || self.is_live())
    }

    /// The address space's interval sequence (`invalidate_seq`): even when no
    /// invalidation touches an interval notifier. For tests and diagnostics.
    pub fn interval_seq(&self) -> u64 {
        self.inner.interval.seq()
    }

    /// Interval notifiers linked in the tree now (deferred inserts not
    /// counted yet, deferred removes still counted).
    pub fn interval_count(&self) -> usize {
        self.inner.interval.count()
    }

    /// Invalidations in flight as counted by the interval part (Linux
    /// `active_invalidate_ranges`). For tests and diagnostics.
    pub fn interval_active_ranges(&self) -> u64 {
        self.inner.interval.active()
    }
}
