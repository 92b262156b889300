//! [`HitTable`]: the lock-free read side of the cache. Registrations by
//! start page in an open-addressing table whose slots are RCU cells of the
//! address space's SRCU domain: a hit reads it inside a read-side section
//! (a thread-local counter) without taking the cache lock or writing any
//! shared word, and the registration it finds stays alive for the section.
//!
//! Writers hold the cache lock (the `&Index` every write method takes is
//! the witness). Removing a registration replaces its slot; the old slot
//! value, which holds one `Arc` of the registration, is freed after a grace
//! period, so the teardown of a registration that left the cache waits for
//! [`Domain::barrier`](mmu_notifier::srcu::Domain::barrier) (see
//! `CacheState::reap`). The table doubles when a key's probe window is
//! full; the old table is retired the same way.

use std::sync::Arc;

use mmu_notifier::rcu::{RcuCell, RcuSlots, SlotRef};
use mmu_notifier::srcu::{Domain, ReadGuard};
use mmu_notifier::sync::{AtomicUsize, Ordering};
use mmu_notifier::PAGE_SIZE;

use crate::entry::Reg;
use crate::index::Index;
use crate::{AddressSpace, Registrar};

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

    /// The registration starting in the page of `addr` that `covers`
    /// accepts, if the table holds one; valid while `section` lasts.
    #[inline]
    pub(crate) fn find<'a>(
        &'a self,
        section: &'a ReadGuard,
        addr: u64,
        covers: impl Fn(&Reg<S, R>) -> bool,
    ) -> Option<SlotRef<'a, Reg<S, R>>> {
        let page = page_of(addr);
        let table = self.table.read(section);
        window(page, table.len())
            .filter(|&i| table.key(i) == page)
            .filter_map(|i| table.get(section, i))
            .find(|r| page_of(r.start) == page && covers(r))
    }

    /// Adds `reg` (under the cache lock, `_held`) and marks it as held by
    /// the table. A full window doubles the table when it is half full;
    /// otherwise (many registrations starting in one page) `reg` stays out
    /// of it and only the locked lookup finds it.
    pub(crate) fn insert(&self, _held: &Index<S, R>, reg: &Arc<Reg<S, R>>) {
        let page = page_of(reg.start);
        let mut cell = self.table.lock();
        loop {
            let table = cell.get();
            let mut w = table.lock();
            if let Some(i) = window(page, table.len()).find(|&i| w.get(i).is_none()) {
                w.set(i, Some((page, reg.clone())));
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
                        Some(j) => g.set(j, Some((p, r.to_arc()))),
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
        let page = page_of(reg.start);
        let cell = self.table.lock();
        let table = cell.get();
        let mut w = table.lock();
        let found = window(page, table.len())
            .find(|&i| w.get(i).is_some_and(|r| std::ptr::eq(&*r, &**reg)));
        if let Some(i) = found {
            w.set(i, None);
            self.used.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
