//! The classic notifier list (Linux's RCU hlist), read without locks.
//!
//! The list is an immutable, versioned [`Snapshot`]; writers (register,
//! unregister, put, exit) build a new one under a mutex and bump the version.
//! Readers do not take the mutex or touch a shared reference count: each
//! thread keeps the last snapshot it used for a few address spaces in a
//! thread-local cache and reuses it while the version is unchanged. Memory
//! safety therefore comes from `Arc` alone (no `unsafe`); *when* a removed
//! notifier may no longer be called is decided by the SRCU grace period
//! ([`crate::srcu`]): readers walk a snapshot only inside a read-side section,
//! and removers wait for a grace period after publishing the new version.
//!
//! Each entry remembers the version that first contained it. An
//! `invalidate_range_end` skips entries newer than the snapshot its start
//! used, so a registration can never split a start/end pair
//! without any lock shared between invalidations and registration.
//!
//! Cost of the cache: a thread keeps the snapshot it last used for an address
//! space until it walks that address space again, evicts it (the cache has
//! [`CACHE_SLOTS`] entries), or exits. An unregistered notifier's memory can
//! therefore be held that long; its callbacks are never run after unregister.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use crate::notifier::{Callbacks, MmuNotifier, NotifierAlloc};
use crate::sync::{self, AtomicBool, AtomicU32, AtomicU64, Mutex, Ordering};

/// Address spaces a thread caches a snapshot for.
pub(crate) const CACHE_SLOTS: usize = 4;

/// One registered notifier (Linux `struct mmu_notifier` on the hlist).
pub(crate) struct Entry {
    pub(crate) ops: Arc<dyn MmuNotifier>,
    pub(crate) callbacks: Callbacks,
    /// First list version containing this entry.
    pub(crate) version: u64,
    /// Set for entries created by `get`: the allocator, also the get/put key.
    pub(crate) alloc: Option<Arc<dyn NotifierAlloc>>,
    /// get/put reference count (register sets 1). Changed under the list mutex.
    pub(crate) users: AtomicU32,
    /// On the list (Linux: not "unhashed"). Changed under the list mutex.
    pub(crate) linked: AtomicBool,
    /// Unregistered or finally put: the handle is dead. Under the list mutex.
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

/// An immutable list state: entries newest first (Linux adds at the head).
pub(crate) struct Snapshot {
    pub(crate) version: u64,
    pub(crate) entries: Box<[Arc<Entry>]>,
}

/// The list of one address space.
pub(crate) struct NotifierList {
    /// Unique per list, the thread-local cache key.
    key: u64,
    version: AtomicU64,
    current: Mutex<Arc<Snapshot>>,
}

/// One cached snapshot of one address space; `key == 0` means empty (list
/// keys start at 1).
struct CacheSlot {
    key: u64,
    version: u64,
    snap: Option<Arc<Snapshot>>,
}

impl CacheSlot {
    const EMPTY: CacheSlot = CacheSlot {
        key: 0,
        version: 0,
        snap: None,
    };

    #[inline(always)]
    fn get(&self, key: u64, version: u64) -> Option<&Arc<Snapshot>> {
        if self.key == key && self.version == version {
            self.snap.as_ref()
        } else {
            None
        }
    }
}

struct Cache {
    slots: [CacheSlot; CACHE_SLOTS],
    next_victim: usize,
    /// Slot filled or hit last; `find` tries it first.
    last: Cell<usize>,
}

// Constant initialiser: no lazy-init check on access, only the destructor
// registration state (the slots own `Arc`s).
#[cfg(not(loom))]
sync::thread_local! {
    static CACHE: RefCell<Cache> = const {
        RefCell::new(Cache { slots: [CacheSlot::EMPTY; CACHE_SLOTS], next_victim: 0, last: Cell::new(0) })
    };
}

#[cfg(loom)]
loom::thread_local! {
    static CACHE: RefCell<Cache> =
        RefCell::new(Cache { slots: [CacheSlot::EMPTY; CACHE_SLOTS], next_victim: 0, last: Cell::new(0) });
}

impl Cache {
    /// The slot of `key` if it holds `version`, trying the last used first (a
    /// thread usually works on one address space).
    #[inline(always)]
    fn find(&self, key: u64, version: u64) -> Option<&Arc<Snapshot>> {
        match self.slots[self.last.get() % CACHE_SLOTS].get(key, version) {
            Some(snap) => Some(snap),
            None => self.find_other(key, version),
        }
    }

    #[inline(never)]
    fn find_other(&self, key: u64, version: u64) -> Option<&Arc<Snapshot>> {
        let i = self
            .slots
            .iter()
            .position(|s| s.get(key, version).is_some())?;
        self.last.set(i);
        self.slots[i].snap.as_ref()
    }

    fn insert(&mut self, key: u64, snap: Arc<Snapshot>) {
        let i = match self.slots.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                let i = self.next_victim;
                self.next_victim = (i + 1) % CACHE_SLOTS;
                i
            }
        };
        self.slots[i] = CacheSlot {
            key,
            version: snap.version,
            snap: Some(snap),
        };
        self.last.set(i);
    }
}

impl NotifierList {
    pub(crate) fn new(key: u64) -> NotifierList {
        NotifierList {
            key,
            version: AtomicU64::new(0),
            current: Mutex::new(Arc::new(Snapshot {
                version: 0,
                entries: Box::new([]),
            })),
        }
    }

    /// Runs `f` on the current snapshot. Call inside an SRCU read-side
    /// section when `f` runs callbacks.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        let version = self.version.load(Ordering::Acquire);
        CACHE.with(|cache| {
            if let Ok(c) = cache.try_borrow() {
                if let Some(snap) = c.find(self.key, version) {
                    return f(snap);
                }
            }
            self.with_slow(cache, f)
        })
    }

    #[cold]
    fn with_slow<R>(&self, cache: &RefCell<Cache>, f: impl FnOnce(&Snapshot) -> R) -> R {
        let snap = self.current();
        // Nested walks (a callback walking another address space) cannot
        // update the cache while the outer walk borrows it; they just skip it.
        if let Ok(mut c) = cache.try_borrow_mut() {
            c.insert(self.key, snap.clone());
        }
        f(&snap)
    }

    /// The current snapshot (takes the mutex; for writers and slow paths).
    pub(crate) fn current(&self) -> Arc<Snapshot> {
        sync::lock(&self.current).clone()
    }

    /// Runs `f` with the writer lock held; `f` may return a new entry list
    /// (newest first) to publish as the next version.
    pub(crate) fn update<R>(
        &self,
        f: impl FnOnce(&Arc<Snapshot>, u64) -> (Option<Vec<Arc<Entry>>>, R),
    ) -> R {
        let mut cur = sync::lock(&self.current);
        let next_version = cur.version + 1;
        let (new, r) = f(&cur, next_version);
        if let Some(entries) = new {
            *cur = Arc::new(Snapshot {
                version: next_version,
                entries: entries.into_boxed_slice(),
            });
            // Release pairs with the reader's acquire: a reader that sees the
            // new version finds the new snapshot under the mutex.
            self.version.store(next_version, Ordering::Release);
        }
        r
    }
}
