//! [`RcuSlots`]: a fixed array of RCU-published `Arc`s with keys and tags,
//! the read side of a lock-free hash table.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::ptr::NonNull;

use super::srcu::{Domain, ReadGuard};
#[cfg(doc)]
use super::RcuCell;
use crate::sync::{self, AtomicPtr, Mutex, MutexGuard, Ordering};

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
