//! The core's only `unsafe` code, all of it on the RCU read side:
//!
//! * [`RcuCell`]: a pointer published and retired with RCU semantics;
//! * [`RcuSlots`]: a fixed array of RCU-published `Arc`s with keys and tags (the
//!   read side of a lock-free hash table);
//! * [`Backend`]: the contract an embedder's reader lookup must keep;
//! * `Anchored` (crate-private): a notifier reached with one load from the
//!   list snapshot, kept alive by the entry that owns it;
//! * `tls` (crate-private, std only): the global domain's reader counters
//!   living in thread-locals, read by grace periods under the registry lock.
//!
//! Every `unsafe` block carries its `// SAFETY:` argument.
//!
//! [`RcuCell`] is Linux's `rcu_assign_pointer` / `srcu_dereference` /
//! "`call_srcu`, then free" as a type:
//!
//! * A reader inside a read-side section of the cell's [`Domain`] gets a
//!   plain `&T` with [`RcuCell::read`]: one acquire load, no reference count
//!   and no lock. The reference cannot outlive the section (its lifetime is
//!   the guard's).
//! * Writers take the cell's writer lock ([`RcuCell::lock`]), read the
//!   current value, and [`replace`](RcuWriteGuard::replace) it: the new value
//!   is published with a release store, and the old one is *retired*: it is
//!   freed by a function queued on the domain ([`Domain::call`]), which runs
//!   only after a grace period that began after the replace.
//!
//! # Why this is sound
//!
//! A value is freed at exactly two points: when the cell itself is dropped
//! (exclusive access: no reader can hold a borrow of it), and by the deferred
//! function of a retirement. A reader can only have loaded a retired pointer
//! in a section that began before the replace published its successor
//! (the release store of `replace` and the acquire load of `read`), and the
//! deferred function runs only after a grace period that began after the
//! replace, which waits for every such section ([`Domain`]'s algorithm). The
//! section must be of the *same* domain: `read` checks that, because a
//! section of another domain is invisible to this domain's grace periods.
//!
//! The read side's correctness also rests on each reader counter being used
//! by one context at a time; the std build guarantees that with thread-local
//! readers, an embedder with the [`Backend`] contract. Invalidation pairs
//! use [`RcuCell::enter`], which opens the section on the cell's own domain
//! and keeps it with the reference ([`RcuRef`]), so no domain check is
//! needed there.
//!
//! loom models of publication, of a reader that keeps using the old value
//! while the writer retires it, and of the grace period before the free are
//! in `tests/loom.rs` (`rcu_*`); the shuttle whole-system tests run every
//! hook through this module.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::srcu::{Domain, ReadGuard, Reader};
use crate::sync::{self, AtomicPtr, Mutex, MutexGuard, Ordering};

/// What an embedder without `std` supplies to an SRCU [`Domain`]: which
/// reader the calling context uses, how to wait, and the fence pair of the
/// read side. The std build has its own (thread-local readers,
/// `membarrier(2)` fences, sleeping back-off) and needs none.
///
/// # Safety
///
/// [`reader`](Backend::reader) must return a reader that
/// [`Domain::register_reader`] of the *same* domain handed out, and no other
/// execution context may use that reader from the moment a context enters a
/// read-side section with it until the section ends: a reader counts its
/// sections with plain loads and stores, so two contexts sharing one could
/// end a grace period early and let memory be freed under a reader. A reader
/// per task (thread) is always right; a reader per CPU is right only where a
/// section is never preempted or migrated. (A reader of another domain is
/// caught at run time and refused with a panic.)
///
/// The fences must pair: [`light_barrier`](Backend::light_barrier) on the
/// reader and [`heavy_barrier`](Backend::heavy_barrier) on the writer must
/// together order each side's earlier store before its later load (both
/// `fence(SeqCst)` does; a compiler fence with an inter-processor barrier on
/// every CPU running a reader does too, as `membarrier(2)` or an IPI).
pub unsafe trait Backend: Sync + 'static {
    /// The calling context's reader of `domain`.
    fn reader(&self, domain: &'static Domain) -> &'static Reader;

    /// Waits a little: called in every loop that waits for another context
    /// (a grace period, an interval invalidation in flight, deferred
    /// functions still running). A kernel yields to its scheduler here; a
    /// hypervisor pauses.
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// The reader's side of the fence pair; runs on every outermost
    /// `read_lock`.
    #[inline]
    fn light_barrier(&self) {
        sync::fence(Ordering::SeqCst);
    }

    /// The writer's side of the fence pair; runs twice per grace period.
    fn heavy_barrier(&self) {
        sync::fence(Ordering::SeqCst);
    }
}

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

/// A fixed number of slots, each an RCU-published `Arc<T>` with a `u64` key
/// and [`SLOT_TAGS`] `u64` tags beside it, all in one cache line: the
/// building block of a lock-free hash table (a registration cache's hit
/// path) whose readers decide on a slot from its key and tags alone, and
/// dereference the value only when they need more of it.
///
/// * Readers inside a read-side section of the domain take a
///   [`SlotsReader`] ([`reader`](Self::reader), which checks the section's
///   domain once) and [`view`](SlotsReader::view) a slot: its key, its tags
///   and its value as one consistent snapshot (a per-slot sequence count,
///   as Linux's `seqcount_t`: a view that raced a writer is retried), plus
///   a *stamp* word readers may write ([`SlotView::stamp_with`], an LRU
///   clock). [`get`](Self::get) is the value alone (one acquire load).
/// * Writers take the writer lock ([`lock`](Self::lock)) and
///   [`set`](RcuSlotsWriter::set) a slot: key, tags, stamp and the new
///   `Arc` are written inside an odd sequence count, the `Arc` published
///   with a release store; the old one is retired like an [`RcuCell`]'s
///   value (its `Arc` is dropped by a function queued on the domain, after
///   a grace period).
///
/// Soundness is [`RcuCell`]'s argument, per slot: the pointer came from
/// `Arc::into_raw`, is retired only after it was unpublished, and the
/// retired `Arc` is dropped only after a grace period that waits for every
/// section that could have loaded it. The sequence count adds no `unsafe`:
/// it only decides whether a view's key and tags belong to the value it
/// loaded.
pub struct RcuSlots<T: Send + Sync + 'static> {
    slots: Box<[SlotCell<T>]>,
    writer: Mutex<()>,
    domain: &'static Domain,
    _owns: PhantomData<alloc::sync::Arc<T>>,
}

/// Tags per slot of an [`RcuSlots`].
pub const SLOT_TAGS: usize = 2;

/// One slot: a cache line of its own, so a reader's view costs one miss.
#[repr(C, align(64))]
struct SlotCell<T> {
    /// Even when stable, odd while the writer changes the fields below
    /// (all but `stamp`).
    seq: crate::sync::AtomicU64,
    key: crate::sync::AtomicU64,
    tags: [crate::sync::AtomicU64; SLOT_TAGS],
    /// From `Arc::into_raw`, or null for an empty slot.
    ptr: AtomicPtr<T>,
    /// Written by readers too (outside the sequence count).
    stamp: crate::sync::AtomicU64,
}

impl<T> SlotCell<T> {
    fn empty() -> Self {
        use crate::sync::AtomicU64;
        SlotCell {
            seq: AtomicU64::new(0),
            key: AtomicU64::new(0),
            tags: core::array::from_fn(|_| AtomicU64::new(0)),
            ptr: AtomicPtr::new(core::ptr::null_mut()),
            stamp: AtomicU64::new(0),
        }
    }
}

impl<T: Send + Sync + 'static> core::fmt::Debug for RcuSlots<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RcuSlots")
            .field("len", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// A value found in an [`RcuSlots`], borrowed for a read-side section.
pub struct SlotRef<'a, T> {
    value: &'a T,
}

impl<T> core::ops::Deref for SlotRef<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        self.value
    }
}

impl<T> SlotRef<'_, T> {
    /// An owned `Arc` of the value, to keep it past the section (one
    /// reference-count increment).
    pub fn to_arc(&self) -> alloc::sync::Arc<T> {
        let p: *const T = self.value;
        // SAFETY: a `SlotRef` is made only by `RcuSlots::get` or
        // `SlotView::value` (inside a section) or `RcuSlotsWriter::get`
        // (under the writer lock), from a pointer that came from
        // `Arc::into_raw` and whose count is still owned by its slot (or by
        // its retirement, which waits for the section or the lock). Taking
        // one more count does not touch that one.
        unsafe {
            alloc::sync::Arc::increment_strong_count(p);
            alloc::sync::Arc::from_raw(p)
        }
    }
}

/// The section-checked read side of an [`RcuSlots`]: made once per lookup
/// by [`RcuSlots::reader`], it views slots for as long as the section lasts.
pub struct SlotsReader<'a, T: Send + Sync + 'static> {
    table: &'a RcuSlots<T>,
    _section: &'a ReadGuard,
}

/// What a reader saw in one slot: its key and tags as they were set with
/// the value, and the value itself (not yet dereferenced: deciding from
/// the key and tags costs no access to it).
pub struct SlotView<'a, T> {
    key: u64,
    tags: [u64; SLOT_TAGS],
    value: &'a T,
    stamp: &'a crate::sync::AtomicU64,
}

impl<'a, T> SlotView<'a, T> {
    /// The key the value was set with.
    #[inline(always)]
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The tags the value was set with.
    #[inline(always)]
    pub fn tags(&self) -> [u64; SLOT_TAGS] {
        self.tags
    }

    /// The value (reading it is the first access to its memory).
    #[inline(always)]
    pub fn get(&self) -> &'a T {
        self.value
    }

    /// The value as a [`SlotRef`] (to take an `Arc` of it).
    #[inline(always)]
    pub fn value(&self) -> SlotRef<'a, T> {
        SlotRef { value: self.value }
    }

    /// Sets the slot's stamp to `now` unless it already holds it (so
    /// readers stamping the same clock tick write nothing shared).
    #[inline(always)]
    pub fn stamp_with(&self, now: u64) {
        if self.stamp.load(Ordering::Relaxed) != now {
            self.stamp.store(now, Ordering::Relaxed);
        }
    }
}

/// What a writer puts in a slot of an [`RcuSlots`].
pub struct SlotEntry<T> {
    /// The key readers compare.
    pub key: u64,
    /// Words readers get with the key, consistent with the value.
    pub tags: [u64; SLOT_TAGS],
    /// The stamp's first value.
    pub stamp: u64,
    /// The value; the slot owns this count.
    pub value: alloc::sync::Arc<T>,
}

/// The writer lock of an [`RcuSlots`]: the slots' values cannot change
/// under it except through [`set`](Self::set).
#[must_use = "the writer lock is released when the guard is dropped"]
pub struct RcuSlotsWriter<'a, T: Send + Sync + 'static> {
    table: &'a RcuSlots<T>,
    _lock: MutexGuard<'a, ()>,
}

/// An `Arc` unpublished from a slot, dropped after a grace period.
struct RetiredArc<T>(NonNull<T>);

// SAFETY: it owns one count of an `Arc<T>` with `T: Send + Sync`, which
// may be dropped on any thread.
unsafe impl<T: Send + Sync> Send for RetiredArc<T> {}

impl<T> RetiredArc<T> {
    fn release(self) {
        // SAFETY: the pointer came from `Arc::into_raw` and this is the one
        // count its slot owned, given up exactly once, after the grace
        // period that began once it was unpublished.
        drop(unsafe { alloc::sync::Arc::from_raw(self.0.as_ptr()) });
    }
}

/// Views of a slot retried while its writer is inside (a writer holds the
/// sequence odd for a handful of stores); past this the slot reads as
/// empty, which a hash table's reader treats as a miss, never as a wrong
/// value.
const VIEW_RETRIES: usize = 16;

impl<T: Send + Sync + 'static> RcuSlots<T> {
    /// `len` empty slots, read in sections of `domain`.
    pub fn new(len: usize, domain: &'static Domain) -> Self {
        RcuSlots {
            slots: (0..len).map(|_| SlotCell::empty()).collect(),
            writer: Mutex::new(()),
            domain,
            _owns: PhantomData,
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots at all.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The domain whose sections protect the values.
    pub fn domain(&self) -> &'static Domain {
        self.domain
    }

    /// The key last set in slot `i` (a hint: it may belong to a value being
    /// replaced; [`SlotsReader::view`] gives it consistently). Panics if
    /// `i` is out of bounds.
    #[inline(always)]
    pub fn key(&self, i: usize) -> u64 {
        self.slots[i].key.load(Ordering::Relaxed)
    }

    /// The value in slot `i`, borrowed for `section` (of this table's
    /// domain: checked, as [`RcuCell::read`]). Panics if `i` is out of
    /// bounds.
    #[inline(always)]
    pub fn get<'a>(&'a self, section: &'a ReadGuard, i: usize) -> Option<SlotRef<'a, T>> {
        self.reader(section).value(i)
    }

    /// The read side for `section`, which must be of this table's domain
    /// (checked here, once, as [`RcuCell::read`] does).
    #[inline(always)]
    pub fn reader<'a>(&'a self, section: &'a ReadGuard) -> SlotsReader<'a, T> {
        assert!(
            core::ptr::eq(section.domain(), self.domain),
            "RcuSlots read with a read-side section of another SRCU domain"
        );
        SlotsReader {
            table: self,
            _section: section,
        }
    }

    /// Takes the writer lock.
    pub fn lock(&self) -> RcuSlotsWriter<'_, T> {
        RcuSlotsWriter {
            table: self,
            _lock: sync::lock(&self.writer),
        }
    }
}

impl<'a, T: Send + Sync + 'static> SlotsReader<'a, T> {
    /// The value in slot `i` (one acquire load). Panics if `i` is out of
    /// bounds.
    #[inline(always)]
    pub fn value(&self, i: usize) -> Option<SlotRef<'a, T>> {
        let p = self.table.slots[i].ptr.load(Ordering::Acquire);
        // SAFETY: a non-null pointer came from `Arc::into_raw` (`set`), and
        // its `Arc` is dropped only by `Drop` (exclusive access) or after a
        // grace period that began after it was unpublished, which waits for
        // the section (of this table's domain, checked by `reader`) if this
        // load saw it; the borrow lasts for the section.
        (!p.is_null()).then(|| SlotRef {
            value: unsafe { &*p },
        })
    }

    /// Slot `i`'s key, tags and value as one snapshot, or `None` when it is
    /// empty (or its writer stayed inside for 16 tries).
    /// Panics if `i` is out of bounds.
    ///
    /// The sequence count (Linux `raw_read_seqcount` / `read_seqcount_retry`
    /// without fences): the writer makes it odd, then writes every field
    /// with a release store, then makes it even. If any of our acquire loads
    /// read a field the writer wrote, the odd count happens-before our
    /// re-read of it, which then differs from the even count we began
    /// with; so an unchanged even count means every field came from one
    /// `set`.
    #[inline(always)]
    pub fn view(&self, i: usize) -> Option<SlotView<'a, T>> {
        let cell = &self.table.slots[i];
        for _ in 0..VIEW_RETRIES {
            let begin = cell.seq.load(Ordering::Acquire);
            if begin & 1 == 0 {
                let key = cell.key.load(Ordering::Acquire);
                let tags = core::array::from_fn(|t| cell.tags[t].load(Ordering::Acquire));
                let p = cell.ptr.load(Ordering::Acquire);
                if cell.seq.load(Ordering::Relaxed) == begin {
                    if p.is_null() {
                        return None;
                    }
                    // SAFETY: as in `value`: `p` was loaded in the section
                    // while published, and its `Arc` is dropped only after a
                    // grace period that waits for the section.
                    let value = unsafe { &*p };
                    return Some(SlotView {
                        key,
                        tags,
                        value,
                        stamp: &cell.stamp,
                    });
                }
            }
            view_backoff();
        }
        None
    }
}

/// The pause between two views of a slot being written: a yield point
/// under loom and shuttle (whose schedulers must run the writer), a spin
/// hint otherwise.
#[inline]
fn view_backoff() {
    #[cfg(any(loom, shuttle))]
    crate::sync::thread::yield_now();
    #[cfg(not(any(loom, shuttle)))]
    core::hint::spin_loop();
}

impl<T: Send + Sync + 'static> RcuSlotsWriter<'_, T> {
    /// The value in slot `i` (stable while the lock is held and the borrow
    /// lasts: only `set`, which needs `&mut self`, replaces it).
    pub fn get(&self, i: usize) -> Option<SlotRef<'_, T>> {
        let p = self.table.slots[i].ptr.load(Ordering::Acquire);
        // SAFETY: under the writer lock nothing else unpublishes slot `i`,
        // and the `Arc` published there is dropped only after `set` retired
        // it, which this shared borrow of the guard rules out meanwhile.
        (!p.is_null()).then(|| SlotRef {
            value: unsafe { &*p },
        })
    }

    /// Slot `i`'s tags as the last `set` wrote them.
    pub fn tags(&self, i: usize) -> [u64; SLOT_TAGS] {
        let cell = &self.table.slots[i];
        core::array::from_fn(|t| cell.tags[t].load(Ordering::Relaxed))
    }

    /// Slot `i`'s stamp (readers may have moved it since `set`).
    pub fn stamp(&self, i: usize) -> u64 {
        self.table.slots[i].stamp.load(Ordering::Relaxed)
    }

    /// Publishes `entry` in slot `i` (or empties it), retiring the `Arc` it
    /// held; see [`SlotsReader::view`] for the sequence count.
    pub fn set(&mut self, i: usize, entry: Option<SlotEntry<T>>) {
        let slot = &self.table.slots[i];
        let seq = slot.seq.load(Ordering::Relaxed);
        slot.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        let new = match entry {
            Some(SlotEntry {
                key,
                tags,
                stamp,
                value,
            }) => {
                slot.key.store(key, Ordering::Release);
                for (cell, tag) in slot.tags.iter().zip(tags) {
                    cell.store(tag, Ordering::Release);
                }
                slot.stamp.store(stamp, Ordering::Relaxed);
                alloc::sync::Arc::into_raw(value).cast_mut()
            }
            None => core::ptr::null_mut(),
        };
        let old = slot.ptr.swap(new, Ordering::AcqRel);
        slot.seq.store(seq.wrapping_add(2), Ordering::Release);
        if let Some(old) = NonNull::new(old) {
            let retired = RetiredArc(old);
            self.table.domain.call(move || retired.release());
        }
    }
}

impl<T: Send + Sync + 'static> Drop for RcuSlots<T> {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            let p = slot.ptr.load(Ordering::Acquire);
            if let Some(p) = NonNull::new(p) {
                // `&mut self`: no reader borrows a value; each published
                // pointer owns one count, given up here once.
                RetiredArc(p).release();
            }
        }
    }
}

/// A reference into a value kept alive by an `Arc` that travels with it: the
/// walk reaches a notifier with one load of this pointer, where an
/// `Arc<dyn MmuNotifier>` first loads the alignment from the vtable to find
/// its value (and the hooks' walks make one call per notifier).
pub(crate) struct Anchored<O: ?Sized, T: ?Sized> {
    /// Points into `*owner` (or at a `'static`), see [`Anchored::new`].
    ptr: NonNull<T>,
    /// Never handed out, so no `&mut O` (`Arc::get_mut`) can exist while
    /// `ptr` does.
    owner: alloc::sync::Arc<O>,
}

// SAFETY: an `Anchored` is an `Arc<O>` plus a shared reference derived from
// it; it is `Send`/`Sync` exactly when both parts would be: `Arc<O>` needs
// `O: Send + Sync`, `&T` needs `T: Sync` to be shared or sent.
unsafe impl<O: ?Sized + Send + Sync, T: ?Sized + Sync> Send for Anchored<O, T> {}
// SAFETY: as for `Send`.
unsafe impl<O: ?Sized + Send + Sync, T: ?Sized + Sync> Sync for Anchored<O, T> {}

impl<O, T: ?Sized> Anchored<O, T> {
    /// The reference `project` returns for the owner, kept with the owner.
    pub(crate) fn new(
        owner: alloc::sync::Arc<O>,
        project: impl for<'a> FnOnce(&'a O) -> &'a T,
    ) -> Self {
        let ptr = NonNull::from(project(&owner));
        Anchored { ptr, owner }
    }

    /// The owner.
    pub(crate) fn owner(&self) -> &alloc::sync::Arc<O> {
        &self.owner
    }

    /// The same reference, with the owner's type forgotten (it is only kept
    /// alive): what lets a module hold a part of a value without naming the
    /// whole.
    pub(crate) fn erase_owner(self) -> Anchored<dyn Send + Sync, T>
    where
        O: Send + Sync + 'static,
    {
        // The pointer still points into the same `*owner`, which the
        // unsized `Arc` keeps alive exactly as the sized one did.
        Anchored {
            ptr: self.ptr,
            owner: self.owner,
        }
    }
}

impl<O: ?Sized, T: ?Sized> core::ops::Deref for Anchored<O, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: `ptr` came from a `&'a T` that `project` derived from a
        // `&'a O` borrow of `*owner` (the signature allows nothing else but a
        // `'static`). Such a reference stays valid while `*owner` is alive and
        // not mutably borrowed: `owner` keeps it alive (its `Arc` is ours, and
        // the `Arc`'s value never moves), and a `&mut O` would need
        // `Arc::get_mut` on our `owner`, which we never expose. Our `&self`
        // borrow bounds the returned reference.
        unsafe { self.ptr.as_ref() }
    }
}

/// The std build's fast reader of [`Domain::global`]: the section counter
/// lives directly in a thread-local (one `%fs`-relative load and store per
/// section, as liburcu's), and the domain's registry holds its address.
///
/// A registered address stays valid because the thread removes it, under the
/// registry lock, in a thread-local destructor that runs before the thread's
/// thread-local storage is freed, and the grace period reads registered
/// counters only while holding that lock ([`TlsCounter::load`] takes the
/// lock guard as its witness). After that destructor ran, the thread's
/// sections use a heap reader instead (the counter's `REGISTERED` bit is
/// cleared).
///
/// Not built under loom or shuttle, whose atomics cannot live in a constant
/// thread-local: there every reader is a heap reader, running the same
/// counter algorithm.
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub(crate) mod tls {
    use core::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::MutexGuard;

    /// Set in a thread's counter while its address is in the registry.
    pub(crate) const REGISTERED: usize = 1 << (usize::BITS - 2);

    std::thread_local! {
        static CTR: AtomicUsize = const { AtomicUsize::new(0) };
        static REG: Registration = const { Registration(Cell::new(None)) };
    }

    /// The address of one thread's counter, in the registry.
    pub(crate) struct TlsCounter(*const AtomicUsize);

    // SAFETY: the pointer is only dereferenced by `load`, under the registry
    // lock, while the owning thread keeps it valid (see the module docs); an
    // `AtomicUsize` may be read from any thread.
    unsafe impl Send for TlsCounter {}

    impl TlsCounter {
        /// The counter's value. `_registry` is the guard of the registry that
        /// holds `self`: while it is held the owning thread cannot finish
        /// exiting.
        #[inline]
        pub(crate) fn load<T>(&self, _registry: &MutexGuard<'_, T>) -> usize {
            // SAFETY: `self` is in the registry whose lock `_registry` holds
            // (callers pass the guard they found `self` through). An entry is
            // removed, under that lock, by the `Registration` destructor of its
            // thread before that thread's thread-local storage is freed, so
            // the pointee is alive for the whole borrow.
            unsafe { (*self.0).load(Ordering::Acquire) }
        }

        /// Whether this is the calling thread's counter.
        pub(crate) fn is_mine(&self) -> bool {
            CTR.with(|c| core::ptr::eq(c, self.0))
        }
    }

    /// Removes the thread's counter from the registry when the thread exits.
    struct Registration(Cell<Option<&'static super::Domain>>);

    impl Drop for Registration {
        fn drop(&mut self) {
            if let Some(domain) = self.0.take() {
                // From now on this thread reads through a heap reader.
                let _ = CTR.try_with(|c| c.fetch_and(!REGISTERED, Ordering::Relaxed));
                domain.unregister_tls();
            }
        }
    }

    /// The calling thread's counter as a registry entry, if this thread can
    /// still register one (its destructors have not run yet). `register`
    /// adds it to the registry; then the `REGISTERED` bit is set.
    pub(crate) fn register(
        domain: &'static super::Domain,
        register: impl FnOnce(TlsCounter),
    ) -> bool {
        REG.try_with(|r| {
            if r.0.get().is_some() {
                return;
            }
            let Ok(addr) = CTR.try_with(|c| c as *const AtomicUsize) else {
                return;
            };
            register(TlsCounter(addr));
            r.0.set(Some(domain));
            CTR.with(|c| c.fetch_or(REGISTERED, Ordering::Relaxed));
        })
        .is_ok()
            && CTR.with(|c| c.load(Ordering::Relaxed) & REGISTERED != 0)
    }

    /// Enters a section on the thread-local counter: `false` (nothing done)
    /// if this thread's counter is not registered. `gp` is the domain's
    /// global counter, `light` the read side's fence.
    #[inline(always)]
    pub(crate) fn enter(gp: &AtomicUsize, nest_mask: usize, light: impl FnOnce()) -> bool {
        CTR.with(|c| {
            let v = c.load(Ordering::Relaxed);
            // Registered and idle (depth 0, whatever the stale phase bit):
            // the outermost section, the common case, in one test.
            if v & (nest_mask | REGISTERED) == REGISTERED {
                c.store(gp.load(Ordering::Relaxed) | REGISTERED, Ordering::Relaxed);
                light();
                true
            } else if v & nest_mask != 0 {
                c.store(v + 1, Ordering::Relaxed);
                true
            } else {
                false
            }
        })
    }

    /// Ends a section entered with [`enter`] (`nest_mask`: the depth bits).
    #[inline(always)]
    pub(crate) fn exit(nest_mask: usize) {
        let _ = nest_mask;
        CTR.with(|c| {
            // The phase bit may stay when the depth drops to 0: an idle
            // counter is recognised by its depth alone. Release: everything
            // the section did happens-before a grace period that observes
            // the section ended.
            c.store(c.load(Ordering::Relaxed) - 1, Ordering::Release);
        })
    }

    /// The calling thread's counter (for `in_read_section`).
    pub(crate) fn current() -> usize {
        CTR.try_with(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
    }
}
