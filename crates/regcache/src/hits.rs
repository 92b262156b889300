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

use mmu_notifier::rcu::RcuCell;
use mmu_notifier::srcu::{Domain, ReadGuard};
use mmu_notifier::sync::Ordering;
use mmu_notifier::PAGE_SIZE;

use crate::entry::Reg;
use crate::index::Index;
use crate::{Access, AddressSpace, Registrar};

/// Slots a key may live in: its home slot and the next ones.
const WINDOW: usize = 8;

/// One cached registration as the read side sees it: what a hit checks
/// inline (one cache line), and the registration.
pub(crate) struct Slot<S: AddressSpace, R: Registrar> {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) access: Access,
    pub(crate) reg: Arc<Reg<S, R>>,
}

type Cell<S, R> = RcuCell<Option<Slot<S, R>>>;

struct Table<S: AddressSpace, R: Registrar> {
    slots: Box<[Cell<S, R>]>,
    mask: usize,
}

pub(crate) struct HitTable<S: AddressSpace, R: Registrar> {
    table: RcuCell<Table<S, R>>,
    domain: &'static Domain,
}

fn home(page: u64, mask: usize) -> usize {
    // Fibonacci hashing of the page number: consecutive pages spread out.
    ((page / PAGE_SIZE).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize & mask
}

impl<S: AddressSpace, R: Registrar> Table<S, R> {
    fn new(capacity: usize, domain: &'static Domain) -> Self {
        let n = capacity.next_power_of_two().max(WINDOW * 2);
        Table {
            slots: (0..n).map(|_| RcuCell::new(None, domain)).collect(),
            mask: n - 1,
        }
    }

    fn window(&self, page: u64) -> impl Iterator<Item = &Cell<S, R>> {
        let h = home(page, self.mask);
        (0..WINDOW).map(move |i| &self.slots[(h + i) & self.mask])
    }
}

impl<S: AddressSpace, R: Registrar> HitTable<S, R> {
    /// A table for about `capacity` registrations in `domain`'s sections.
    pub(crate) fn new(capacity: usize, domain: &'static Domain) -> Self {
        HitTable {
            table: RcuCell::new(Table::new(capacity * 2, domain), domain),
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

    /// The registration starting at `page` that `covers` accepts, if the
    /// table holds one; valid while `section` lasts.
    #[inline]
    pub(crate) fn find<'a>(
        &'a self,
        section: &'a ReadGuard,
        page: u64,
        covers: impl Fn(&Slot<S, R>) -> bool,
    ) -> Option<&'a Slot<S, R>> {
        let table = self.table.read(section);
        table
            .window(page)
            .filter_map(|cell| cell.read(section).as_ref())
            .find(|s| s.start & !(PAGE_SIZE - 1) == page && covers(s))
    }

    /// Adds `reg` (under the cache lock, `_held`), growing the table when
    /// its window is full. Marks it as held by the table.
    pub(crate) fn insert(&self, _held: &Index<S, R>, reg: &Arc<Reg<S, R>>) {
        let mut table = self.table.lock();
        loop {
            if let Some(cell) = table
                .get()
                .window(reg.start)
                .find(|c| c.lock().get().is_none())
            {
                cell.lock().replace(Some(Slot {
                    start: reg.start,
                    end: reg.end,
                    access: reg.access,
                    reg: reg.clone(),
                }));
                reg.hashed.store(true, Ordering::Relaxed);
                return;
            }
            // The window is full: double, moving every registration over.
            let old = table.get();
            let grown = Table::new(old.slots.len() * 2, self.domain);
            for cell in old.slots.iter() {
                if let Some(s) = cell.lock().get() {
                    let dest = grown.window(s.start).find(|c| c.lock().get().is_none());
                    // A window of the doubled table holds at most what the
                    // old one did; if it is full anyway, the registration
                    // is only found by the locked lookup (still correct).
                    if let Some(dest) = dest {
                        dest.lock().replace(Some(Slot {
                            start: s.start,
                            end: s.end,
                            access: s.access,
                            reg: s.reg.clone(),
                        }));
                    } else {
                        s.reg.hashed.store(false, Ordering::Relaxed);
                    }
                }
            }
            table.replace(grown);
        }
    }

    /// Takes `reg` out (under the cache lock, `_held`); its slot's `Arc` is
    /// dropped after a grace period.
    pub(crate) fn remove(&self, _held: &Index<S, R>, reg: &Arc<Reg<S, R>>) {
        if !reg.hashed.swap(false, Ordering::Relaxed) {
            return;
        }
        let table = self.table.lock();
        for cell in table.get().window(reg.start) {
            let mut c = cell.lock();
            if c.get().as_ref().is_some_and(|s| Arc::ptr_eq(&s.reg, reg)) {
                c.replace(None);
                return;
            }
        }
    }
}
