//! The classic notifier list (Linux's RCU hlist), read without locks.
//!
//! The list is an immutable, versioned [`Snapshot`] behind an RCU pointer
//! ([`RcuCell`]): writers (register, unregister, put, exit) build a new
//! snapshot under the cell's writer lock, publish it, and retire the old one,
//! which is freed after a grace period. A hook dereferences the pointer
//! inside the SRCU read-side section it runs its callbacks in: one acquire
//! load, no lock, no reference count, no thread-local cache. *When* a removed
//! notifier may no longer be called is decided by the same grace periods
//! ([`crate::srcu`]): removers wait for one after publishing the list without
//! it.
//!
//! An invalidation keeps the snapshot its start walked, inside the read-side
//! section its start opened, until its end: the end walks exactly the
//! notifiers the start walked, so a registration can never split a start/end
//! pair, and a removal (which waits for a grace period) returns only after
//! the pairs in flight have ended. No lock is shared between invalidations
//! and registration.
//!
//! A snapshot stores, next to each entry, the fields a walk needs (the
//! callback object and its callback set), so the walk touches
//! one array and one vtable per notifier, as Linux's hlist walk touches one
//! node and one ops table. The hook pair's walks go through two more arrays
//! of the same snapshot, the entries with a start callback and those with
//! an end callback, so they test no flag per notifier.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::notifier::{Callbacks, MmuNotifier, NotifierAlloc};
use crate::rcu::{Anchored, RcuCell, RcuRef};
use crate::srcu::Domain;
use crate::sync::{AtomicBool, AtomicU32, Ordering};

/// One registered notifier (Linux `struct mmu_notifier` on the hlist).
pub(crate) struct Entry {
    pub(crate) ops: Arc<dyn MmuNotifier>,
    pub(crate) callbacks: Callbacks,
    /// First list version containing this entry.
    pub(crate) version: u64,
    /// Set for entries created by `get`: the allocator, also the get/put key.
    pub(crate) alloc: Option<Arc<dyn NotifierAlloc>>,
    /// get/put reference count (register sets 1). Changed under the writer
    /// lock.
    pub(crate) users: AtomicU32,
    /// On the list (Linux: not "unhashed"). Changed under the writer lock.
    pub(crate) linked: AtomicBool,
    /// Unregistered or finally put: the handle is dead. Under the writer lock.
    pub(crate) retired: AtomicBool,
    /// Whoever sets this first runs `release`: exactly once per notifier.
    pub(crate) release_claimed: AtomicBool,
}

impl Entry {
    /// Claims the single `release` call of this notifier.
    pub(crate) fn claim_release(&self) -> bool {
        !self.release_claimed.swap(true, Ordering::AcqRel)
    }
}

/// An entry as a snapshot holds it: what a walk reads, inline: the
/// notifier (one load away), its callback set, and the entry that owns it.
pub(crate) struct Linked {
    pub(crate) ops: Anchored<Entry, dyn MmuNotifier>,
    pub(crate) callbacks: Callbacks,
}

impl Linked {
    fn of(entry: Arc<Entry>) -> Linked {
        let callbacks = entry.callbacks;
        Linked {
            ops: Anchored::new(entry, |e| &*e.ops),
            callbacks,
        }
    }

    /// The registration this is the snapshot's copy of.
    pub(crate) fn entry(&self) -> &Arc<Entry> {
        self.ops.owner()
    }
}

/// An immutable list state: entries newest first (Linux adds at the head).
pub(crate) struct Snapshot {
    pub(crate) version: u64,
    pub(crate) entries: Box<[Linked]>,
    /// The entries with `invalidate_range_start`, and those with
    /// `invalidate_range_end`, in list order: the hook pair walks these
    /// (Linux tests each ops pointer for NULL on every walk; the test is
    /// made once here, when the list changes).
    pub(crate) starts: Box<[Linked]>,
    pub(crate) ends: Box<[Linked]>,
}

impl Snapshot {
    /// The snapshot of `entries` (newest first) as list version `version`.
    fn of(version: u64, entries: Vec<Arc<Entry>>) -> Snapshot {
        let with = |c: Callbacks| -> Box<[Linked]> {
            entries
                .iter()
                .filter(|e| e.callbacks.contains(c))
                .map(|e| Linked::of(e.clone()))
                .collect()
        };
        Snapshot {
            version,
            starts: with(Callbacks::INVALIDATE_RANGE_START),
            ends: with(Callbacks::INVALIDATE_RANGE_END),
            entries: entries.into_iter().map(Linked::of).collect(),
        }
    }

    /// The entries, as owners (for writers building the next version).
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.entries.iter().map(Linked::entry)
    }
}

/// The list of one address space.
pub(crate) struct NotifierList {
    current: RcuCell<Snapshot>,
}

impl NotifierList {
    pub(crate) fn new(domain: &'static Domain) -> NotifierList {
        NotifierList {
            current: RcuCell::new(Snapshot::of(0, Vec::new()), domain),
        }
    }

    /// Opens a read-side section and takes the current snapshot in it; both
    /// last until the returned value is dropped.
    #[inline(always)]
    pub(crate) fn enter(&self) -> RcuRef<'_, Snapshot> {
        self.current.enter()
    }

    /// Number of entries now (takes the writer lock).
    pub(crate) fn len(&self) -> usize {
        self.current.lock().get().entries.len()
    }

    /// Runs `f` with the writer lock held; `f` may return a new entry list
    /// (newest first) to publish as the next version. The replaced snapshot
    /// is freed after a grace period.
    pub(crate) fn update<R>(
        &self,
        f: impl FnOnce(&Snapshot, u64) -> (Option<Vec<Arc<Entry>>>, R),
    ) -> R {
        let mut w = self.current.lock();
        let next_version = w.get().version + 1;
        let (new, r) = f(w.get(), next_version);
        if let Some(entries) = new {
            w.replace(Snapshot::of(next_version, entries));
        }
        r
    }
}
