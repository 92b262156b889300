//! [`RcuCell`]: one pointer published and retired with RCU semantics.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::ptr::NonNull;

use super::srcu::{Domain, ReadGuard};
use crate::sync::{self, AtomicPtr, Mutex, MutexGuard, Ordering};

/// A value readable without locks inside read-side sections of one SRCU
/// [`Domain`], replaced by writers under the cell's own lock; replaced values
/// are freed after a grace period.
///
/// ```
/// use mmu_notifier::rcu::RcuCell;
/// use mmu_notifier::srcu::Domain;
///
/// let cell = RcuCell::new(vec![1, 2, 3], Domain::global());
/// {
///     let section = Domain::global().read_lock();
///     assert_eq!(cell.read(&section).len(), 3);
/// }
/// cell.lock().replace(vec![4]);
/// let section = Domain::global().read_lock();
/// assert_eq!(cell.read(&section), &vec![4]);
/// ```
pub struct RcuCell<T: Send + Sync + 'static> {
    ptr: AtomicPtr<T>,
    writer: Mutex<()>,
    domain: &'static Domain,
    _owns: PhantomData<Box<T>>,
}

impl<T: Send + Sync + 'static> core::fmt::Debug for RcuCell<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RcuCell").finish_non_exhaustive()
    }
}

/// The value of an [`RcuCell`] together with the read-side section that
/// protects it ([`RcuCell::enter`]): dereferences to the value; dropping it
/// ends the section. Not `Send`, like the section.
pub struct RcuRef<'a, T> {
    value: &'a T,
    _section: ReadGuard,
}

impl<T> core::ops::Deref for RcuRef<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        self.value
    }
}

impl<T> core::fmt::Debug for RcuRef<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RcuRef")
    }
}

/// Proof that the writer lock of an [`RcuCell`] is held: the current value
/// can be read and replaced. Dropping it releases the lock.
#[must_use = "the writer lock is released when the guard is dropped"]
pub struct RcuWriteGuard<'a, T: Send + Sync + 'static> {
    cell: &'a RcuCell<T>,
    _lock: MutexGuard<'a, ()>,
}

/// A retired pointer on its way to the domain's deferred queue.
struct Retired<T>(NonNull<T>);

// SAFETY: a `Retired<T>` is the sole remaining owner of a `Box<T>` (nothing
// but readers' shared borrows refer to the value, and those end before the
// free runs); moving that ownership to the thread that runs deferred
// functions is moving a `Box<T>`, which is `Send` for `T: Send`.
unsafe impl<T: Send> Send for Retired<T> {}

impl<T> Retired<T> {
    /// Frees the value. Only called by the deferred function that
    /// [`RcuWriteGuard::replace`] queued, i.e. after a grace period.
    fn free(self) {
        // SAFETY: the pointer came from `Box::into_raw` (in `RcuCell::new` or
        // `replace`) and was unpublished by exactly one `replace`, which
        // moved it into this `Retired` and nowhere else; so this is the only
        // free. We run after a grace period that began after the value was
        // unpublished: every section that could have loaded it has ended, and
        // the borrows `read` handed out were tied to those sections.
        #[cfg(not(loom))]
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
        // Under loom the destructor runs but the allocation is leaked, so a
        // model of a broken retirement reports the race on the value's
        // cells instead of reading freed memory.
        // SAFETY: as above; the value is dropped once and never used again.
        #[cfg(loom)]
        unsafe {
            core::ptr::drop_in_place(self.0.as_ptr())
        };
    }
}

impl<T: Send + Sync + 'static> RcuCell<T> {
    /// A cell holding `value`, read under sections of `domain`.
    pub fn new(value: T, domain: &'static Domain) -> Self {
        RcuCell {
            ptr: AtomicPtr::new(Box::into_raw(Box::new(value))),
            writer: Mutex::new(()),
            domain,
            _owns: PhantomData,
        }
    }

    /// The domain whose sections protect readers of this cell.
    pub fn domain(&self) -> &'static Domain {
        self.domain
    }

    /// The current value (Linux `srcu_dereference`): one acquire load. The
    /// borrow lasts as long as the read-side section.
    ///
    /// # Panics
    /// If `section` is a section of another domain (it would not protect the
    /// value): a bug in the caller, refused rather than risking a free under
    /// the borrow.
    #[inline(always)]
    pub fn read<'a>(&'a self, section: &'a ReadGuard) -> &'a T {
        assert!(
            core::ptr::eq(section.domain(), self.domain),
            "RcuCell::read with a read-side section of another SRCU domain"
        );
        // Acquire pairs with the release store in `new`/`replace`: the
        // value's initialisation happens-before our use of it.
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: `p` came from `Box::into_raw` and is never null. It is
        // freed either when the cell is dropped, which needs exclusive access
        // and so cannot overlap `'a`, or by the deferred function of the
        // `replace` that unpublished it, which runs after a grace period of
        // `self.domain` that began after that replace. We loaded `p` inside
        // `section`, a section of that same domain (checked above) that is
        // still running for all of `'a`; a section that saw `p` began before
        // `p` was unpublished, so that grace period waits for it. Nothing
        // writes through the pointer after publication (values are
        // immutable), so shared borrows are fine.
        unsafe { &*p }
    }

    /// Enters a read-side section of the cell's domain and dereferences the
    /// cell in it: the value stays valid, and the section stays open, until
    /// the returned [`RcuRef`] is dropped.
    #[inline(always)]
    pub fn enter(&self) -> RcuRef<'_, T> {
        let section = self.domain.read_lock();
        // Acquire pairs with the release store in `new`/`replace`.
        let p = self.ptr.load(Ordering::Acquire);
        RcuRef {
            // SAFETY: as in `read`: `p` is a published value, loaded inside
            // `section`, a section of `self.domain` (we opened it on that
            // domain). The borrow lives in the `RcuRef` next to the section
            // and is only handed out through `Deref`, i.e. for less than the
            // `RcuRef`'s own life, so it ends before the section does; a
            // retired value is freed only after a grace period that waits for
            // this section; dropping the cell needs exclusive access, which
            // the `'_` borrow of the cell excludes.
            value: unsafe { &*p },
            _section: section,
        }
    }

    /// Takes the writer lock. Writers are serialised; readers never wait.
    pub fn lock(&self) -> RcuWriteGuard<'_, T> {
        RcuWriteGuard {
            cell: self,
            _lock: sync::lock(&self.writer),
        }
    }
}

impl<T: Send + Sync + 'static> RcuWriteGuard<'_, T> {
    /// The current value. Stays valid while the guard is held: only the
    /// holder of the writer lock replaces it.
    pub fn get(&self) -> &T {
        let p = self.cell.ptr.load(Ordering::Acquire);
        // SAFETY: `p` is the published value (from `Box::into_raw`). Only a
        // `replace`, which needs `&mut self` of the one writer guard, can
        // unpublish and retire it, so it stays allocated while this `&self`
        // borrow of the guard lasts.
        unsafe { &*p }
    }

    /// Publishes `value` (Linux `rcu_assign_pointer`) and retires the old
    /// value: it is freed after a grace period of the cell's domain, by the
    /// domain's deferred queue (whoever completes the next grace period runs
    /// it; [`Domain::barrier`] waits for it).
    pub fn replace(&mut self, value: T) {
        let new = Box::into_raw(Box::new(value));
        // Release: the new value's initialisation happens-before any reader
        // that loads the pointer (acquire in `read`).
        let old = self.cell.ptr.swap(new, Ordering::AcqRel);
        let Some(old) = NonNull::new(old) else {
            unreachable!("an RcuCell always holds a value")
        };
        let retired = Retired(old);
        self.cell.domain.call(move || retired.free());
    }
}

impl<T: Send + Sync + 'static> Drop for RcuCell<T> {
    fn drop(&mut self) {
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: `&mut self` proves no reader borrows the current value
        // (`read` borrows the cell for as long as the value), and no writer
        // guard exists. Retired values are owned by their deferred functions,
        // not by the cell. `p` came from `Box::into_raw` and is freed once,
        // here.
        drop(unsafe { Box::from_raw(p) });
    }
}
