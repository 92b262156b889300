//! Registration lifetimes: register / unregister, get / put, and the
//! address-space exit (`release`).
//!
//! Where this differs from Linux, on purpose:
//! * `release` runs **exactly once** per notifier: exit and unregister race
//!   for a per-notifier claim, and the loser waits for the winner's call
//!   through the grace period (Linux may call it twice).
//! * [`crate::synchronize`] is a real barrier: it returns only after every
//!   deferred free queued by earlier puts has run.
//! * Misuse that Linux BUGs or WARNs on returns an [`Error`].

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::debug::Warning;
use crate::list::{Entry, Snapshot};
use crate::notifier::{Callbacks, MmuNotifier, NotifierAlloc};
use crate::range::{Event, Range};
use crate::subscriptions::{MmapWriteGuard, Subscriptions, SubscriptionsRef};
use crate::sync::Ordering;
use crate::Error;

/// The entries of `cur` except `entry` (list order kept).
fn without(cur: &Snapshot, entry: &Arc<Entry>) -> Vec<Arc<Entry>> {
    cur.entries()
        .filter(|e| !Arc::ptr_eq(e, entry))
        .cloned()
        .collect()
}

/// A registered notifier (Linux's `struct mmu_notifier *` as the driver keeps
/// it). Clones refer to the same registration; pass it to
/// [`SubscriptionsRef::unregister`] or [`SubscriptionsRef::put`].
#[derive(Clone)]
pub struct NotifierHandle {
    mm_key: u64,
    entry: Arc<Entry>,
}

impl core::fmt::Debug for NotifierHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NotifierHandle")
            .field("mm", &self.mm_key)
            .field("version", &self.entry.version)
            .field("users", &self.users())
            .field("registered", &self.is_registered())
            .finish()
    }
}

impl NotifierHandle {
    /// The notifier object.
    pub fn notifier(&self) -> &Arc<dyn MmuNotifier> {
        &self.entry.ops
    }

    /// Whether neither unregister nor the final put has happened yet. (After
    /// exit the notifier is off the list but still counts as registered until
    /// unregister/put, as in Linux.)
    pub fn is_registered(&self) -> bool {
        !self.entry.retired.load(Ordering::Acquire)
    }

    /// Current get/put reference count.
    pub fn users(&self) -> u32 {
        self.entry.users.load(Ordering::Relaxed)
    }
}

impl<'a> MmapWriteGuard<'a> {
    /// Registers `notifier` with the mmap write lock held (Linux
    /// `__mmu_notifier_register`). Same semantics as
    /// [`SubscriptionsRef::register`].
    ///
    /// # Errors
    /// As [`SubscriptionsRef::register`].
    pub fn register(&self, notifier: Arc<dyn MmuNotifier>) -> Result<NotifierHandle, Error> {
        self.mm.add_entry(notifier, None)
    }

    /// [`SubscriptionsRef::get`] with the mmap write lock held (Linux
    /// `mmu_notifier_get_locked`).
    ///
    /// # Errors
    /// As [`SubscriptionsRef::get`].
    pub fn get(&self, alloc: &Arc<dyn NotifierAlloc>) -> Result<NotifierHandle, Error> {
        self.mm.get_under(self, alloc)
    }

    /// The address space whose lock this is.
    pub fn subscriptions(&self) -> &'a SubscriptionsRef {
        self.mm
    }
}

impl SubscriptionsRef {
    fn check_handle(&self, h: &NotifierHandle) -> Result<(), Error> {
        if h.mm_key == self.inner.key {
            Ok(())
        } else {
            Err(Error::WrongAddressSpace)
        }
    }

    pub(crate) fn refuse_in_callback(&self, what: &'static str) -> Result<(), Error> {
        if self.inner.domain.in_read_section() {
            tracing::warn!(
                "mmu_notifier: {what} from a notifier callback refused (would deadlock)"
            );
            Err(Error::WouldDeadlock(what))
        } else {
            Ok(())
        }
    }

    /// Registers `notifier` (Linux `mmu_notifier_register`): takes the mmap
    /// write lock itself. The notifier sees every invalidation that starts
    /// after this returns, and never an end without its start.
    ///
    /// # Errors
    /// [`Error::AddressSpaceExited`], [`Error::SecondaryTlbWithStartEnd`],
    /// [`Error::FailingStartWithEnd`], or [`Error::WouldDeadlock`] from a
    /// callback.
    pub fn register(&self, notifier: Arc<dyn MmuNotifier>) -> Result<NotifierHandle, Error> {
        self.refuse_in_callback("register")?;
        self.inner.domain.try_reclaim();
        self.mmap_write().register(notifier)
    }

    fn add_entry(
        &self,
        ops: Arc<dyn MmuNotifier>,
        alloc: Option<Arc<dyn NotifierAlloc>>,
    ) -> Result<NotifierHandle, Error> {
        let callbacks = ops.callbacks();
        if callbacks.contains(Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS)
            && callbacks
                .intersects(Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END)
        {
            self.inner.diag.report(
                Warning::SecondaryTlbWithStartEnd,
                "refusing a notifier with arch_invalidate_secondary_tlbs and start/end",
            );
            return Err(Error::SecondaryTlbWithStartEnd);
        }
        if callbacks.contains(Callbacks::START_MAY_FAIL)
            && callbacks.contains(Callbacks::INVALIDATE_RANGE_END)
        {
            return Err(Error::FailingStartWithEnd);
        }
        let mm_key = self.inner.key;
        let handle = self.inner.list.update(|cur, version| {
            if !self.inner.live.load(Ordering::Relaxed) {
                return (None, Err(Error::AddressSpaceExited));
            }
            let entry = Arc::new(Entry {
                ops,
                callbacks,
                version,
                alloc,
                users: crate::sync::AtomicU32::new(1),
                linked: crate::sync::AtomicBool::new(true),
                retired: crate::sync::AtomicBool::new(false),
                release_claimed: crate::sync::AtomicBool::new(false),
            });
            let mut entries = Vec::with_capacity(cur.entries.len() + 1);
            entries.push(entry.clone());
            entries.extend(cur.entries().cloned());
            (Some(entries), Ok(NotifierHandle { mm_key, entry }))
        })?;
        self.inner
            .mode
            .fetch_or(crate::subscriptions::Mode::HAS_NOTIFIERS, Ordering::Release);
        Ok(handle)
    }

    /// Takes `entry` off the list if it is still on it.
    fn unlink(&self, entry: &Arc<Entry>) {
        self.inner.list.update(|cur, _| {
            if !entry.linked.load(Ordering::Relaxed) {
                return (None, ());
            }
            entry.linked.store(false, Ordering::Relaxed);
            let rest = without(cur, entry);
            (Some(rest), ())
        });
    }

    /// Calls `release` on `entry` if nobody has yet, inside a read-side
    /// section; a panic is caught and reported.
    fn release_once(&self, entry: &Entry) {
        if entry.claim_release() && entry.callbacks.contains(Callbacks::RELEASE) {
            #[cfg(all(feature = "std", panic = "unwind"))]
            {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    entry.ops.release();
                }));
                if r.is_err() {
                    self.inner
                        .diag
                        .report(Warning::CallbackPanicked, "release callback panicked");
                }
            }
            #[cfg(not(all(feature = "std", panic = "unwind")))]
            entry.ops.release();
        }
    }

    /// Unregisters (Linux `mmu_notifier_unregister`): calls `release` unless
    /// exit already did, takes the notifier off the list and waits for a grace
    /// period. When it returns, no callback of the notifier runs or will run,
    /// and its `release` has run exactly once and finished. May sleep.
    ///
    /// Better than Linux: the grace period also waits for the invalidation
    /// pairs in flight (each holds a read-side section from start to end), so
    /// a notifier that saw a pair's start also gets its end before this
    /// returns.
    ///
    /// # Errors
    /// [`Error::NotRegistered`] the second time, [`Error::ManagedByGetPut`]
    /// for notifiers from [`get`](Self::get), [`Error::WrongAddressSpace`],
    /// and [`Error::WouldDeadlock`] from a callback or from the thread of an
    /// invalidation pair in flight.
    pub fn unregister(&self, handle: &NotifierHandle) -> Result<(), Error> {
        self.check_handle(handle)?;
        self.refuse_in_callback("unregister")?;
        crate::debug::might_sleep();
        let entry = &handle.entry;
        let linked = self.inner.list.update(|_, _| {
            if entry.retired.load(Ordering::Relaxed) {
                return (None, Err(Error::NotRegistered));
            }
            if entry.alloc.is_some() {
                return (None, Err(Error::ManagedByGetPut));
            }
            entry.retired.store(true, Ordering::Release);
            (None, Ok(entry.linked.load(Ordering::Relaxed)))
        })?;
        if linked {
            {
                let _srcu = self.inner.domain.read_lock();
                self.release_once(entry);
            }
            self.unlink(entry);
        }
        // Waits for callbacks still running, including a `release` the exit
        // path claimed first.
        self.inner.domain.synchronize_unchecked();
        Ok(())
    }

    /// Finds or creates the notifier of `alloc` on this address space and
    /// takes a reference (Linux `mmu_notifier_get`): takes the mmap write lock.
    ///
    /// # Errors
    /// [`Error::RefcountOverflow`], [`Error::Alloc`], the registration errors,
    /// or [`Error::WouldDeadlock`] from a callback.
    pub fn get(&self, alloc: &Arc<dyn NotifierAlloc>) -> Result<NotifierHandle, Error> {
        self.refuse_in_callback("get")?;
        self.inner.domain.try_reclaim();
        self.mmap_write().get(alloc)
    }

    /// The body of [`MmapWriteGuard::get`], under the guard.
    fn get_under(
        &self,
        _held: &MmapWriteGuard<'_>,
        alloc: &Arc<dyn NotifierAlloc>,
    ) -> Result<NotifierHandle, Error> {
        let key = Arc::as_ptr(alloc) as *const ();
        let mm_key = self.inner.key;
        let found = self.inner.list.update(|cur, _| {
            let hit = cur.entries().find(|e| {
                e.alloc
                    .as_ref()
                    .is_some_and(|a| core::ptr::eq(Arc::as_ptr(a) as *const (), key))
            });
            let r = hit.map(|e| {
                let users = e.users.load(Ordering::Relaxed);
                if users == u32::MAX {
                    return Err(Error::RefcountOverflow);
                }
                e.users.store(users + 1, Ordering::Relaxed);
                Ok(NotifierHandle {
                    mm_key,
                    entry: e.clone(),
                })
            });
            (None, r)
        });
        if let Some(r) = found {
            return r;
        }
        let notifier = alloc.alloc_notifier(self).map_err(Error::Alloc)?;
        match self.add_entry(notifier.clone(), Some(alloc.clone())) {
            Ok(h) => Ok(h),
            Err(e) => {
                alloc.free_notifier(notifier);
                Err(e)
            }
        }
    }

    /// Drops a reference taken by [`get`](Self::get) or
    /// [`register`](Self::register) (Linux `mmu_notifier_put`). The last one
    /// takes the notifier off the list and queues its free (`free_notifier`)
    /// to run after a grace period. Never calls `release` and never blocks;
    /// may be called from `release`. Call `mmu_notifier::synchronize` (or
    /// [`Domain::barrier`](crate::srcu::Domain::barrier) of the address
    /// space's domain) before depending on the free having run.
    ///
    /// # Errors
    /// [`Error::PutUnderflow`] (also reported as a warning) if the count is
    /// already zero, [`Error::WrongAddressSpace`].
    pub fn put(&self, handle: &NotifierHandle) -> Result<(), Error> {
        self.check_handle(handle)?;
        let entry = &handle.entry;
        let last = self.inner.list.update(|cur, _| {
            let users = entry.users.load(Ordering::Relaxed);
            if users == 0 || entry.retired.load(Ordering::Relaxed) {
                return (None, Err(Error::PutUnderflow));
            }
            entry.users.store(users - 1, Ordering::Relaxed);
            if users > 1 {
                return (None, Ok(false));
            }
            entry.retired.store(true, Ordering::Release);
            if !entry.linked.load(Ordering::Relaxed) {
                return (None, Ok(true));
            }
            entry.linked.store(false, Ordering::Relaxed);
            let rest = without(cur, entry);
            (Some(rest), Ok(true))
        });
        let last = match last {
            Err(e) => {
                self.inner.diag.report(
                    Warning::PutUnderflow,
                    "put on a notifier with no references",
                );
                return Err(e);
            }
            Ok(last) => last,
        };
        if last {
            let entry = entry.clone();
            // Holds the address space (Linux mmgrab) until after the free.
            let mm = self.clone();
            self.inner.domain.call(move || {
                if let Some(alloc) = &entry.alloc {
                    alloc.free_notifier(entry.ops.clone());
                }
                drop(entry);
                drop(mm);
            });
        }
        Ok(())
    }
}

impl Subscriptions {
    /// Address-space exit (Linux `__mmu_notifier_release`, the first thing
    /// `exit_mmap` does): marks the address space dead, calls every list
    /// notifier's `release` (unless unregister already did), takes them all
    /// off the list and waits for a grace period, so no `release` is still
    /// running when the caller goes on to free pages.
    ///
    /// # Errors
    /// [`Error::AlreadyReleased`] the second time; [`Error::WouldDeadlock`]
    /// from a callback.
    pub fn release(&self) -> Result<(), Error> {
        self.refuse_in_callback("release")?;
        let snap = self.inner.list.update(|cur, _| {
            if !self.inner.live.load(Ordering::Relaxed) {
                return (None, Err(Error::AlreadyReleased));
            }
            self.inner.live.store(false, Ordering::Release);
            (None, Ok(cur.entries().cloned().collect::<Vec<_>>()))
        })?;
        if self.interval_enabled() {
            // Interval release: one blockable RELEASE invalidation of the
            // whole address space. Notifiers stay in the tree; their owners
            // still call `remove`.
            let range = Range::everything(Event::Release);
            if self.inner.interval.start(&range).is_ok() {
                self.inner.interval.end();
            }
        }
        if !snap.is_empty() {
            let _srcu = self.inner.domain.read_lock();
            for e in snap.iter() {
                self.release_once(e);
            }
        }
        self.inner.list.update(|cur, _| {
            if cur.entries.is_empty() {
                return (None, ());
            }
            for e in cur.entries() {
                e.linked.store(false, Ordering::Relaxed);
            }
            (Some(Vec::new()), ())
        });
        self.inner.domain.synchronize_unchecked();
        Ok(())
    }
}

/// Waits until every deferred free queued by earlier [`SubscriptionsRef::put`]
/// calls has run (Linux `mmu_notifier_synchronize`, with the documented
/// contract made true: a barrier, not just a grace period). Call it before
/// unloading code whose notifiers were put.
///
/// Address spaces of other domains use
/// [`Domain::barrier`](crate::srcu::Domain::barrier).
///
/// # Errors
/// [`Error::WouldDeadlock`] from a callback or a deferred free.
#[cfg(feature = "std")]
pub fn synchronize() -> Result<(), Error> {
    crate::srcu::barrier()
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;

    struct Nop;
    impl MmuNotifier for Nop {
        fn callbacks(&self) -> Callbacks {
            Callbacks::NONE
        }
    }
    struct Ops;
    impl NotifierAlloc for Ops {
        fn alloc_notifier(
            &self,
            _mm: &SubscriptionsRef,
        ) -> Result<Arc<dyn MmuNotifier>, Box<dyn std::error::Error + Send + Sync>> {
            Ok(Arc::new(Nop))
        }
    }

    /// Linux `-EOVERFLOW` at `UINT_MAX` users, with nothing changed.
    #[test]
    fn get_at_max_users_overflows() {
        let mm = Subscriptions::new();
        let ops: Arc<dyn NotifierAlloc> = Arc::new(Ops);
        let h = mm.get(&ops).unwrap();
        h.entry.users.store(u32::MAX, Ordering::Relaxed);
        assert!(matches!(mm.get(&ops), Err(Error::RefcountOverflow)));
        assert_eq!(h.users(), u32::MAX);
        h.entry.users.store(1, Ordering::Relaxed);
        mm.put(&h).unwrap();
        synchronize().unwrap();
    }
}
