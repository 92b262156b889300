//! Interval notifiers (Linux `struct mmu_interval_notifier`): one callback
//! per virtual-address range, plus a sequence count that tells a concurrent
//! "fault" path its result went stale (collision-retry).
//!
//! # The scheme, in a few lines
//!
//! * The address space has `invalidate_seq` (starts at 2) and a count of
//!   in-flight invalidations. Even: no invalidation touches an interval
//!   notifier. Odd: at least one does, and the tree is frozen.
//! * `invalidate_range_start` counts itself in, and if its range overlaps a
//!   notifier makes the seq odd, then calls `invalidate(sub, range, cur_seq)`
//!   on every overlapping notifier, which must `set_seq(cur_seq)` under the
//!   user's lock. The last `end` makes the seq even again, applies the inserts
//!   and removes that were deferred while it was odd (newest first), and wakes
//!   every waiter.
//! * A reader takes `seq = read_begin()` (waiting while its notifier is being
//!   invalidated), builds its secondary mapping, and under the user lock
//!   commits only if `read_retry(seq)` is false.
//!
//! # Locking
//!
//! `state` (Linux's spinlock) serialises the counters, the deferred list and
//! every tree change; it is never held across a callback. The tree sits in its
//! own `RwLock`: invalidations walk it with a shared guard *after* dropping
//! `state`, which is safe because the tree only changes while the seq is even
//! and a walk only happens while the seq is odd (the "frozen tree"
//! rule, enforced by the lock rather than by convention).
//!
//! # Better than Linux
//!
//! * The read side is lock-free: `read_begin` is two acquire loads and a
//!   compare when the notifier is not being invalidated (Linux takes the
//!   spinlock), and `read_retry` one load. It only takes `state` to sleep.
//! * A non-blockable start whose list phase fails undoes the interval phase
//!   (Linux leaks `active_invalidate_ranges`, after which readers
//!   and removers of overlapping notifiers wait forever).
//! * `read_begin` or `remove` from inside an invalidation callback of the same
//!   address space, which would wait for itself forever, returns
//!   [`Error::WouldDeadlock`].

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::debug::{DiagHandle, Warning};
use crate::itree::{ITree, NodeId};
use crate::range::Range;
use crate::rcu::Anchored;
use crate::srcu::Domain;
use crate::sync::{self, AtomicBool, AtomicU64, Mutex, Ordering, RwLock};
use crate::Error;

/// The callback of an interval notifier (Linux `mmu_interval_notifier_ops`).
pub trait IntervalOps: Send + Sync + 'static {
    /// `range` overlaps `sub`'s interval and its PTEs are about to change.
    ///
    /// Users of [`IntervalNotifier::read_begin`] must call
    /// [`IntervalNotifier::set_seq`]`(cur_seq)` under the same lock their
    /// fault path holds around [`IntervalNotifier::read_retry`], then stop
    /// using their secondary mappings of the range before returning true.
    ///
    /// Return false only when the range is not blockable
    /// (`!range.blockable()`) and proceeding would sleep (for example a
    /// failed `try_lock`); the invalidation then fails with
    /// [`Again`](crate::Again). false in a blockable range is reported
    /// ([`Warning::BlockableStartFailed`]) and treated as true.
    ///
    /// Must not call [`IntervalNotifier::remove`] or
    /// [`IntervalNotifier::read_begin`] of this address space: both wait for
    /// the invalidation in progress (they return
    /// [`Error::WouldDeadlock`] instead).
    fn invalidate(&self, sub: &IntervalNotifier, range: &Range, cur_seq: u64) -> bool;
}

/// Where a notifier is, as seen under `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Inserted while the tree was frozen; waiting on the deferred list.
    PendingInsert,
    /// In the tree.
    Tree(NodeId),
    /// In the tree, and a remove is waiting on the deferred list.
    PendingRemove(NodeId),
    /// Removed (or never inserted).
    Gone,
}

struct IntervalNotifierState {
    start: u64,
    last: u64,
    ops: Arc<dyn IntervalOps>,
    /// The notifier's sequence: odd while inserted.
    seq: AtomicU64,
    /// The interval part of the address space, with the address space held
    /// until remove (Linux `mmgrab`).
    mm: Anchored<dyn Send + Sync, IntervalState>,
    /// Changed only under the address space's `state` lock.
    place: Mutex<Place>,
    removed: AtomicBool,
}

/// An interval notifier (Linux `struct mmu_interval_notifier`, the
/// "interval_sub"): created by [`SubscriptionsRef::interval_insert`](crate::SubscriptionsRef::interval_insert), ended by
/// [`remove`](Self::remove). A cheap handle; clones refer to the same
/// notifier, and [`IntervalOps::invalidate`] receives one.
///
/// Dropping every handle without `remove` leaves the notifier registered
/// (like Linux forgetting `mmu_interval_notifier_remove`).
///
/// ```
/// use std::sync::Arc;
/// use mmu_notifier::{DriverLock, Event, IntervalNotifier, IntervalOps, Range, Subscriptions};
///
/// /// A device page table mirroring one interval, under the user lock.
/// struct Mirror { pt: DriverLock<Vec<u64>> }
/// impl IntervalOps for Mirror {
///     fn invalidate(&self, sub: &IntervalNotifier, r: &Range, cur_seq: u64) -> bool {
///         // Takes the lock, set_seq(cur_seq), drops the mappings.
///         self.pt.invalidate(sub, r, cur_seq, |pt| pt.clear()).is_some()
///     }
/// }
///
/// let mm = Subscriptions::new();
/// let mirror = Arc::new(Mirror { pt: DriverLock::new(vec![]) });
/// let sub = mm.interval_insert(0x10000, 0x4000, mirror.clone()).unwrap();
///
/// // Device fault: snapshot the sequence, read the primary, commit under the
/// // lock unless an invalidation collided.
/// loop {
///     let seq = sub.read_begin().unwrap();
///     let pfns = vec![42u64]; // ... walk the primary page tables ...
///     if mirror.pt.commit(&sub, seq, |pt| *pt = pfns).is_some() {
///         break;
///     }
/// }
///
/// mm.invalidate_range_start(Range::new(0x11000, 0x12000, Event::Unmap).unwrap()).end();
/// assert!(mirror.pt.lock().is_empty());
/// sub.remove().unwrap();
/// ```
#[derive(Clone)]
pub struct IntervalNotifier {
    inner: Arc<IntervalNotifierState>,
}

impl fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("start", &self.inner.start)
            .field("last", &self.inner.last)
            .field("seq", &self.inner.seq.load(Ordering::Relaxed))
            .field("removed", &self.is_removed())
            .finish()
    }
}

/// An entry of the deferred list.
enum DeferredTreeChange {
    Insert(IntervalNotifier),
    Remove(IntervalNotifier),
}

/// What `state` protects (besides tree changes).
struct Locked {
    /// Linux `active_invalidate_ranges`.
    active: u64,
    /// Newest last; processed newest first, like Linux's hlist.
    deferred: Vec<DeferredTreeChange>,
    /// Threads sleeping on `wq`. `notify_all` is a system call even with
    /// nobody to wake, so the final end skips it when this is 0.
    waiters: usize,
}

/// Keeps a value on its own cache line (pairs of lines, for the adjacent-line
/// prefetcher), so readers polling it do not share a line with the lock that
/// every invalidation writes.
#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The interval part of one address space.
pub(crate) struct IntervalState {
    /// Linux `invalidate_seq`. Written only under `state`; read without it by
    /// `read_begin`, hence on a line of its own.
    seq: CachePadded<AtomicU64>,
    state: Mutex<Locked>,
    /// Woken whenever the seq goes from odd to even (waiters hold `state`).
    /// Domains with a backend wait by polling instead.
    #[cfg(feature = "std")]
    wq: sync::Condvar,
    tree: RwLock<ITree<IntervalNotifier>>,
    /// The address space's SRCU domain: its readers also record which
    /// address space's interval callbacks a context is running (saved and
    /// restored around each walk, so nested walks of other address spaces
    /// work), and its backend says how to wait.
    domain: &'static Domain,
    /// The address space's identity ([`SubscriptionsRef::id`](crate::SubscriptionsRef::id)).
    key: u64,
    /// Where the address space's warnings go.
    diag: DiagHandle,
}

impl IntervalState {
    pub(crate) fn new(domain: &'static Domain, key: u64, diag: DiagHandle) -> IntervalState {
        IntervalState {
            seq: CachePadded(AtomicU64::new(2)),
            state: Mutex::new(Locked {
                active: 0,
                deferred: Vec::new(),
                waiters: 0,
            }),
            #[cfg(feature = "std")]
            wq: sync::Condvar::new(),
            tree: RwLock::new(ITree::new()),
            domain,
            key,
            diag,
        }
    }

    /// The address space's current sequence (for tests and diagnostics).
    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// In-flight invalidations counted by the interval part.
    pub(crate) fn active(&self) -> u64 {
        sync::lock(&self.state).active
    }

    /// Begins one range (Linux `mn_itree_invalidate`): counts it in, and invalidates
    /// every overlapping notifier. On `Err` the range has already been
    /// ended again (the caller must not call [`end`](Self::end)).
    pub(crate) fn start(&self, range: &Range) -> Result<(), ()> {
        let mut st = sync::lock(&self.state);
        st.active += 1;
        let tree = sync::read(&self.tree);
        if !tree.overlaps(range.start(), range.last()) {
            return Ok(());
        }
        let cur_seq = self.seq.load(Ordering::Relaxed) | 1;
        self.seq.store(cur_seq, Ordering::Release);
        drop(st);
        // The seq is odd and stays odd until our own end: the tree is frozen,
        // so keeping the shared guard taken for the overlap check blocks no
        // writer (they only write while the seq is even).
        let blockable = range.blockable();
        let key = self.key;
        let failed = {
            let outer = self.domain.set_walking(key);
            let mut failed = false;
            tree.for_each_overlap(range.start(), range.last(), |sub| {
                let ok = contain(|| {
                    let _nb = crate::debug::NonBlockSection::enter(&self.diag, !blockable);
                    sub.inner.ops.invalidate(sub, range, cur_seq)
                });
                match ok {
                    Ok(true) => true,
                    Ok(false) if blockable => {
                        self.diag.report(
                            Warning::BlockableStartFailed,
                            "interval invalidate returned false in a blockable range",
                        );
                        true
                    }
                    Ok(false) => {
                        failed = true;
                        false
                    }
                    Err(_) => {
                        self.diag.report(
                            Warning::CallbackPanicked,
                            "interval invalidate callback panicked",
                        );
                        true
                    }
                }
            });
            self.domain.set_walking(outer);
            drop(tree);
            failed
        };
        if failed {
            self.end();
            return Err(());
        }
        Ok(())
    }

    /// Ends one range (Linux `mn_itree_inv_end`).
    pub(crate) fn end(&self) {
        let mut st = sync::lock(&self.state);
        st.active -= 1;
        let seq = self.seq.load(Ordering::Relaxed);
        if st.active != 0 || seq & 1 == 0 {
            return;
        }
        self.seq.store(seq.wrapping_add(1), Ordering::Release);
        if !st.deferred.is_empty() {
            let mut tree = sync::write(&self.tree);
            for d in st.deferred.drain(..).rev() {
                match d {
                    DeferredTreeChange::Insert(sub) => {
                        let mut place = sync::lock(&sub.inner.place);
                        debug_assert_eq!(*place, Place::PendingInsert);
                        *place =
                            Place::Tree(tree.insert(sub.inner.start, sub.inner.last, sub.clone()));
                    }
                    DeferredTreeChange::Remove(sub) => {
                        let mut place = sync::lock(&sub.inner.place);
                        if let Place::PendingRemove(id) = *place {
                            drop(tree.remove(id));
                        }
                        *place = Place::Gone;
                    }
                }
            }
        }
        let wake = st.waiters != 0;
        drop(st);
        #[cfg(feature = "std")]
        if wake {
            self.wq.notify_all();
        }
        #[cfg(not(feature = "std"))]
        let _ = wake;
    }

    /// Sleeps until the seq differs from `seq`, reading it under `state` (the
    /// 31956166 fix: the final end changes the seq and applies the deferred
    /// list in one critical section, so a changed seq seen under the lock
    /// means the deferred work is done).
    fn wait_seq_change(&self, seq: u64) {
        let mut st = sync::lock(&self.state);
        #[cfg(feature = "std")]
        if self.domain.sleeps() {
            while self.seq.load(Ordering::Relaxed) == seq {
                st.waiters += 1;
                st = sync::wait(&self.wq, st);
                st.waiters -= 1;
            }
            return;
        }
        let mut waiter = self.domain.waiter();
        while self.seq.load(Ordering::Relaxed) == seq {
            drop(st);
            waiter.snooze();
            st = sync::lock(&self.state);
        }
    }
}

/// Runs an interval callback; where panics unwind, a panic is caught
/// (`Err`) so one broken notifier cannot stop the walk.
#[inline]
fn contain<R>(f: impl FnOnce() -> R) -> Result<R, ()> {
    #[cfg(all(feature = "std", panic = "unwind"))]
    return std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| ());
    #[cfg(not(all(feature = "std", panic = "unwind")))]
    return Ok(f());
}

impl IntervalState {
    /// Inserts an interval notifier for `[start, last]` (Linux
    /// `mmu_interval_notifier_insert`'s body, under `state`); `mm` is this
    /// state, held by the notifier with its address space. `live` says
    /// whether the address space still takes registrations (read under
    /// `state`, c9682d10).
    pub(crate) fn insert(
        mm: Anchored<dyn Send + Sync, IntervalState>,
        start: u64,
        last: u64,
        ops: Arc<dyn IntervalOps>,
        live: impl FnOnce() -> bool,
    ) -> Result<IntervalNotifier, Error> {
        let sub = IntervalNotifier {
            inner: Arc::new(IntervalNotifierState {
                start,
                last,
                ops,
                seq: AtomicU64::new(0),
                mm,
                place: Mutex::new(Place::Gone),
                removed: AtomicBool::new(false),
            }),
        };
        let iv = &*sub.inner.mm;
        let mut st = sync::lock(&iv.state);
        // c9682d10: refuse once the address space is no longer live.
        if !live() {
            tracing::warn!("mmu_notifier: interval_insert on an address space that has exited");
            return Err(Error::AddressSpaceExited);
        }
        let seq = iv.seq.load(Ordering::Relaxed);
        let mut place = sync::lock(&sub.inner.place);
        if st.active != 0 {
            // A running invalidation may cover the new range: treat it as
            // colliding, so read_begin waits for every in-flight range.
            if seq & 1 == 1 {
                *place = Place::PendingInsert;
                st.deferred.push(DeferredTreeChange::Insert(sub.clone()));
            } else {
                iv.seq.store(seq | 1, Ordering::Release);
                *place = Place::Tree(sync::write(&iv.tree).insert(start, last, sub.clone()));
            }
            sub.inner.seq.store(seq | 1, Ordering::Release);
        } else {
            if seq & 1 == 1 {
                tracing::warn!("mmu_notifier: odd invalidate_seq with no active range");
            }
            sub.inner.seq.store(seq.wrapping_sub(1), Ordering::Release);
            *place = Place::Tree(sync::write(&iv.tree).insert(start, last, sub.clone()));
        }
        drop(place);
        drop(st);
        Ok(sub)
    }

    /// Interval notifiers linked in the tree now.
    pub(crate) fn count(&self) -> usize {
        sync::read(&self.tree).len()
    }
}

impl IntervalNotifier {
    /// The [`id`](crate::SubscriptionsRef::id) of the address space it was inserted
    /// in.
    pub fn mm_id(&self) -> u64 {
        self.inner.mm.key
    }

    /// First address of the interval.
    pub fn start(&self) -> u64 {
        self.inner.start
    }

    /// Last address of the interval (inclusive).
    pub fn last(&self) -> u64 {
        self.inner.last
    }

    /// Whether [`remove`](Self::remove) was called.
    pub fn is_removed(&self) -> bool {
        self.inner.removed.load(Ordering::Acquire)
    }

    /// Whether the notifier is linked in the tree now (false while its
    /// insert is deferred and after its removal).
    pub fn is_in_tree(&self) -> bool {
        matches!(
            *sync::lock(&self.inner.place),
            Place::Tree(_) | Place::PendingRemove(_)
        )
    }

    /// Whether [`read_begin`](Self::read_begin) would sleep now: an
    /// invalidation covering this notifier (or in flight when it was
    /// inserted) has not ended yet.
    pub fn is_invalidating(&self) -> bool {
        self.inner.seq.load(Ordering::Acquire) == self.inner.mm.seq.load(Ordering::Acquire)
    }

    /// Begins a read section (Linux `mmu_interval_read_begin`): returns the
    /// sequence to pass to [`read_retry`](Self::read_retry), first sleeping
    /// while an invalidation covering this notifier is in flight.
    ///
    /// Lock-free unless it has to sleep: two acquire loads and a compare.
    /// `read_retry` may already be true when this returns; no retry loop is
    /// hidden here, so callers can apply their own time limit.
    ///
    /// # Errors
    /// [`Error::NotRegistered`] after `remove`; [`Error::WouldDeadlock`] when
    /// it would have to wait from inside an invalidation callback of the same
    /// address space.
    #[inline]
    pub fn read_begin(&self) -> Result<u64, Error> {
        // Acquire pairs with the release stores of set_seq and insert: if we
        // see a notifier seq written after the mm seq was made odd, we see
        // that odd mm seq (or a later one) too.
        let seq = self.inner.seq.load(Ordering::Acquire);
        if seq != self.inner.mm.seq.load(Ordering::Acquire) {
            if self.is_removed() {
                return Err(Error::NotRegistered);
            }
            return Ok(seq);
        }
        self.read_begin_wait(seq)
    }

    #[cold]
    fn read_begin_wait(&self, seq: u64) -> Result<u64, Error> {
        if self.is_removed() {
            return Err(Error::NotRegistered);
        }
        if self.inner.mm.domain.walking() == self.inner.mm.key {
            tracing::warn!(
                "mmu_notifier: read_begin from an invalidate callback of the same address space"
            );
            return Err(Error::WouldDeadlock("read_begin"));
        }
        crate::debug::might_sleep();
        self.inner.mm.wait_seq_change(seq);
        Ok(seq)
    }

    /// Whether an invalidation collided with the read section that
    /// [`read_begin`](Self::read_begin) returned `seq` for (Linux
    /// `mmu_interval_read_retry`). Call it holding the lock your
    /// [`IntervalOps::invalidate`] holds around [`set_seq`](Self::set_seq):
    /// the lock is what makes a false answer reliable.
    #[inline]
    pub fn read_retry(&self, seq: u64) -> bool {
        self.inner.seq.load(Ordering::Acquire) != seq
    }

    /// [`read_retry`](Self::read_retry) without the user lock (Linux
    /// `mmu_interval_check_retry`): true is reliable, false only a hint. For
    /// giving up early inside a long fault.
    #[inline]
    pub fn check_retry(&self, seq: u64) -> bool {
        // Same load; only the caller's lock (or its absence) differs.
        self.read_retry(seq)
    }

    /// Records `cur_seq` (Linux `mmu_interval_set_seq`). Call it from
    /// [`IntervalOps::invalidate`], unconditionally, under the lock your
    /// fault path holds around [`read_retry`](Self::read_retry).
    #[inline]
    pub fn set_seq(&self, cur_seq: u64) {
        self.inner.seq.store(cur_seq, Ordering::Release);
    }

    /// Removes the notifier (Linux `mmu_interval_notifier_remove`). When it
    /// returns, no `invalidate` of it is running or will run. May sleep
    /// until the invalidations in flight end.
    ///
    /// # Errors
    /// [`Error::NotRegistered`] the second time; [`Error::WouldDeadlock`]
    /// from an invalidation callback of the same address space while it
    /// would have to wait (nothing is changed then).
    pub fn remove(&self) -> Result<(), Error> {
        let iv = &*self.inner.mm;
        let wait_seq = {
            let mut st = sync::lock(&iv.state);
            if self.inner.removed.load(Ordering::Relaxed) {
                return Err(Error::NotRegistered);
            }
            let seq = iv.seq.load(Ordering::Relaxed);
            let mut place = sync::lock(&self.inner.place);
            let wait = if seq & 1 == 1 {
                match *place {
                    Place::PendingInsert => {
                        // Never in the tree: nothing can be calling it.
                        st.deferred.retain(
                            |d| !matches!(d, DeferredTreeChange::Insert(s) if Arc::ptr_eq(&s.inner, &self.inner)),
                        );
                        *place = Place::Gone;
                        None
                    }
                    Place::Tree(id) => {
                        if iv.domain.walking() == self.inner.mm.key {
                            tracing::warn!("mmu_notifier: interval remove from an invalidate callback of the same address space");
                            return Err(Error::WouldDeadlock("IntervalNotifier::remove"));
                        }
                        *place = Place::PendingRemove(id);
                        st.deferred.push(DeferredTreeChange::Remove(self.clone()));
                        Some(seq)
                    }
                    Place::PendingRemove(_) | Place::Gone => {
                        unreachable!("a notifier not yet removed is pending or in the tree")
                    }
                }
            } else {
                match *place {
                    Place::Tree(id) => drop(sync::write(&iv.tree).remove(id)),
                    other => {
                        tracing::warn!(
                            ?other,
                            "mmu_notifier: remove of a notifier not in the tree"
                        );
                    }
                }
                *place = Place::Gone;
                None
            };
            self.inner.removed.store(true, Ordering::Release);
            wait
        };
        if let Some(seq) = wait_seq {
            crate::debug::might_sleep();
            iv.wait_seq_change(seq);
        }
        Ok(())
    }
}
