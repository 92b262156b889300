//! [`HitTable`]: the lock-free read side of the cache. Registrations by
//! start page in an open-addressing table whose slots are RCU cells of the
//! address space's SRCU domain: a hit reads it inside a read-side section
//! (a thread-local counter) without taking the cache lock or writing any
//! shared word, and the registration it finds stays alive for the section.
//!
//! Each slot is one cache line holding, beside the registration's pointer,
//! what a hit decides on: its start (the key), its end and access (one tag:
//! the end is page aligned, the access bits fill the low bits) and the
//! device's hit key ([`Registrar::hit_key`], the other tag), plus the LRU
//! stamp a hit writes. A hit that needs only those costs one cache miss at
//! scale (the slot); reading the registration itself is a second, dependent
//! one. The last hit's tick lives in the slot ([`HitTable::last_use`]), the
//! locked lookup's in the registration; eviction takes the later.
//!
//! Writers hold the cache lock (the `&Index` every write method takes is
//! the witness). Removing a registration replaces its slot; the old slot
//! value, which holds one `Arc` of the registration, is freed after a grace
//! period, so the teardown of a registration that left the cache waits for
//! [`Domain::barrier`](mmu_notifier::srcu::Domain::barrier) (see
//! `CacheState::reap`). The table doubles when a key's probe window is
//! full; the old table is retired the same way.

use std::sync::Arc;

use mmu_notifier::rcu::{RcuCell, RcuSlots, RcuSlotsWriter, SlotEntry, SlotView, SLOT_TAGS};
use mmu_notifier::srcu::{Domain, ReadGuard};
use mmu_notifier::sync::{AtomicUsize, Ordering};
use mmu_notifier::PAGE_SIZE;

use crate::index::Index;
use crate::reg::Reg;
use crate::{Access, AddressSpace, Registrar};

/// Slots a key may live in: its home slot and the next ones.
const WINDOW: usize = 8;

pub(crate) struct HitTable<S: AddressSpace, R: Registrar> {
    /// The slots, keyed by start page; replaced whole when they double.
    table: RcuCell<RcuSlots<Reg<S, R>>>,
    /// Slots in use (written under the cache lock).
    used: AtomicUsize,
    domain: &'static Domain,
}

fn home(page: u64, len: usize) -> usize {
    // The page number folded onto itself: neighbouring pages (buffers
    // allocated together) land in neighbouring slots, as in a page table,
    // while strides of a power of two still spread (the high bits vary).
    let n = page / PAGE_SIZE;
    let bits = len.trailing_zeros();
    (n ^ (n >> bits) ^ (n >> (2 * bits).min(63))) as usize & (len - 1)
}

/// The page an address lies in: the table's key.
fn page_of(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

/// Which of a slot's tags holds the registration's end and access, and
/// which the device's hit key.
const END_TAG: usize = 0;
const KEY_TAG: usize = 1;

/// The tag holding a registration's end and access.
fn end_tag(end: u64, access: Access) -> u64 {
    debug_assert!(end % PAGE_SIZE == 0 && u64::from(access.bits()) < PAGE_SIZE);
    end | u64::from(access.bits())
}

/// Whether a registration whose key (start) is its request's page and
/// whose end tag is `tag` covers `[.., end)` for `access`.
fn tag_covers(tag: u64, end: u64, access: Access) -> bool {
    end <= tag_end(tag) && Access::from_bits_retain((tag & (PAGE_SIZE - 1)) as u32).contains(access)
}

/// The registration's end, from its end tag.
fn tag_end(tag: u64) -> u64 {
    tag & !(PAGE_SIZE - 1)
}

/// The end of the registration a slot view holds, from the slot alone.
pub(crate) fn view_end<S: AddressSpace, R: Registrar>(v: &SlotView<'_, Reg<S, R>>) -> u64 {
    tag_end(v.tags()[END_TAG])
}

/// The device's hit key of the registration a slot view holds, from the
/// slot alone.
pub(crate) fn view_key<S: AddressSpace, R: Registrar>(v: &SlotView<'_, Reg<S, R>>) -> u64 {
    v.tags()[KEY_TAG]
}

/// The slot of `reg` in the table `w` writes (of `len` slots), if it holds
/// it.
fn slot_of<S: AddressSpace, R: Registrar>(
    w: &RcuSlotsWriter<'_, Reg<S, R>>,
    len: usize,
    reg: &Arc<Reg<S, R>>,
) -> Option<usize> {
    window(page_of(reg.start), len).find(|&i| w.get(i).is_some_and(|r| std::ptr::eq(&*r, &**reg)))
}

/// A slot's entry for `reg`: its start page, end tag, the device's hit key
/// and the last-use stamp.
fn entry<S: AddressSpace, R: Registrar>(
    reg: Arc<Reg<S, R>>,
    hit_key: u64,
    stamp: u64,
) -> SlotEntry<Reg<S, R>> {
    SlotEntry {
        key: page_of(reg.start),
        tags: {
            let mut tags = [0; SLOT_TAGS];
            tags[END_TAG] = end_tag(reg.end, reg.access);
            tags[KEY_TAG] = hit_key;
            tags
        },
        stamp,
        value: reg,
    }
}

/// The slot indices of `page`'s window in a table of `len` slots.
fn window(page: u64, len: usize) -> impl Iterator<Item = usize> {
    let h = home(page, len);
    (0..WINDOW).map(move |i| (h + i) & (len - 1))
}

fn slots<S: AddressSpace, R: Registrar>(
    capacity: usize,
    domain: &'static Domain,
) -> RcuSlots<Reg<S, R>> {
    RcuSlots::new(capacity.next_power_of_two().max(WINDOW * 2), domain)
}

impl<S: AddressSpace, R: Registrar> HitTable<S, R> {
    /// A table for about `capacity` registrations in `domain`'s sections.
    pub(crate) fn new(capacity: usize, domain: &'static Domain) -> Self {
        HitTable {
            table: RcuCell::new(slots(capacity * 2, domain), domain),
            used: AtomicUsize::new(0),
            domain,
        }
    }

    /// The SRCU domain whose sections protect the table.
    pub(crate) fn domain(&self) -> &'static Domain {
        self.domain
    }

    /// Enters a read-side section of the table's domain.
    #[inline]
    pub(crate) fn read_lock(&self) -> ReadGuard {
        self.domain.read_lock()
    }

    /// The slot of a registration starting in the page of `start` that
    /// covers `[start, end)` for `access`, if the table holds one, decided
    /// from the slots alone; its value is valid while `section` lasts.
    /// (Registrations start on a page boundary, so one whose key is
    /// `start`'s page starts at or below `start`.)
    #[inline]
    pub(crate) fn find<'a>(
        &'a self,
        section: &'a ReadGuard,
        start: u64,
        end: u64,
        access: Access,
    ) -> Option<SlotView<'a, Reg<S, R>>> {
        let page = page_of(start);
        let table = self.table.read(section);
        let reader = table.reader(section);
        window(page, table.len())
            .filter(|&i| table.key(i) == page)
            .filter_map(|i| reader.view(i))
            .find(|v| v.key() == page && tag_covers(v.tags()[END_TAG], end, access))
    }

    /// The later of the tick a lock-free hit stamped in `reg`'s slot, if
    /// the table holds it, and `reg`'s own (the locked lookup's).
    pub(crate) fn last_use(&self, reg: &Arc<Reg<S, R>>) -> u64 {
        let own = reg.last_use.load(Ordering::Relaxed);
        if !reg.hashed.load(Ordering::Relaxed) {
            return own;
        }
        let cell = self.table.lock();
        let table = cell.get();
        let w = table.lock();
        slot_of(&w, table.len(), reg).map_or(own, |i| own.max(w.stamp(i)))
    }

    /// Adds `reg` with the device's `hit_key` (under the cache lock,
    /// `_held`) and marks it as held by the table. A full window doubles
    /// the table when it is half full; otherwise (many registrations
    /// starting in one page) `reg` stays out of it and only the locked
    /// lookup finds it.
    pub(crate) fn insert(&self, _held: &Index<S, R>, reg: &Arc<Reg<S, R>>, hit_key: u64) {
        let page = page_of(reg.start);
        let stamp = reg.last_use.load(Ordering::Relaxed);
        let mut cell = self.table.lock();
        loop {
            let table = cell.get();
            let mut w = table.lock();
            if let Some(i) = window(page, table.len()).find(|&i| w.get(i).is_none()) {
                w.set(i, Some(entry(reg.clone(), hit_key, stamp)));
                reg.hashed.store(true, Ordering::Relaxed);
                self.used.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if self.used.load(Ordering::Relaxed) * 2 < table.len() {
                return;
            }
            // The window is full: double, moving every registration over.
            let grown = slots::<S, R>(table.len() * 2, self.domain);
            {
                let mut g = grown.lock();
                for i in 0..table.len() {
                    let Some(r) = w.get(i) else { continue };
                    let p = page_of(r.start);
                    match window(p, grown.len()).find(|&j| g.get(j).is_none()) {
                        Some(j) => {
                            g.set(j, Some(entry(r.to_arc(), w.tags(i)[KEY_TAG], w.stamp(i))))
                        }
                        // A window of the doubled table overfull anyway: the
                        // registration is found by the locked lookup only.
                        None => {
                            r.hashed.store(false, Ordering::Relaxed);
                            self.used.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            drop(w);
            cell.replace(grown);
        }
    }

    /// Takes `reg` out (under the cache lock, `_held`); its slot's `Arc` is
    /// dropped after a grace period.
    pub(crate) fn remove(&self, _held: &Index<S, R>, reg: &Arc<Reg<S, R>>) {
        if !reg.hashed.swap(false, Ordering::Relaxed) {
            return;
        }
        let cell = self.table.lock();
        let table = cell.get();
        let mut w = table.lock();
        if let Some(i) = slot_of(&w, table.len(), reg) {
            w.set(i, None);
            self.used.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
