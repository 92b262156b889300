//! What users hold of a registration: the guard ([`Entry`]) and the
//! lock-free hit ([`Hit`]).

use std::fmt;
use std::sync::Arc;

use mmu_notifier::rcu::SlotView;

use crate::reg::Reg;
use crate::state::CacheState;
use crate::{Access, AddressSpace, Registrar};

/// A registration returned by [`RegCache::get`](crate::RegCache::get): the
/// guard that keeps its device handle registered.
///
/// Clones hold it too; when the last guard is dropped and the registration
/// has left the cache (invalidated, evicted, or the cache dropped), the
/// handle is deregistered, on the thread dropping the guard.
/// [`is_valid`](Self::is_valid) turning false does *not* stop device
/// access already started through the handle: I/O in flight completes into
/// the pages that were registered (the old pages, if the memory was
/// unmapped since). The cache only promises that no lookup made after the
/// change returns this registration.
///
/// Do not drop a guard inside a notifier callback of the same address
/// space: its deregistration would run there.
pub struct Entry<S: AddressSpace, R: Registrar> {
    pub(crate) shared: Arc<CacheState<S, R>>,
    /// `None` only inside `drop`.
    pub(crate) reg: Option<Arc<Reg<S, R>>>,
}

impl<S: AddressSpace, R: Registrar> Entry<S, R> {
    fn reg(&self) -> &Reg<S, R> {
        self.reg.as_deref().expect("set until drop")
    }

    /// Unique id of the registration (ids are never reused by a cache).
    pub fn id(&self) -> u64 {
        self.reg().id
    }

    /// First registered address (the aligned start).
    pub fn start(&self) -> u64 {
        self.reg().start
    }

    /// One past the last registered address.
    pub fn end(&self) -> u64 {
        self.reg().end
    }

    /// Registered bytes.
    pub fn len(&self) -> u64 {
        self.reg().len()
    }

    /// Whether the registration is empty (never: lengths are nonzero).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The access it was registered with (a superset of the request).
    pub fn access(&self) -> Access {
        self.reg().access
    }

    /// The device handle (memory key, slot index...).
    pub fn handle(&self) -> &R::Handle {
        &self.reg().handle
    }

    /// Still cached and coherent with the address space: false once a
    /// change to the memory under it (or an eviction) took it out.
    pub fn is_valid(&self) -> bool {
        self.reg().is_valid()
    }

    /// Runs `f` with the handle if the registration is still valid, holding
    /// the cache lock, which every invalidation of the registration takes
    /// before the address space changes the memory: while `f` runs, the
    /// registration cannot become stale. `None` if it is no longer valid.
    ///
    /// Keep `f` short: munmaps of this memory wait for it. Do not call the
    /// cache from `f` (it would deadlock on the cache lock).
    pub fn while_valid<T>(&self, f: impl FnOnce(&R::Handle) -> T) -> Option<T> {
        let _st = self.shared.lock();
        let reg = self.reg();
        reg.is_valid().then(|| f(&reg.handle))
    }
}

impl<S: AddressSpace, R: Registrar> Clone for Entry<S, R> {
    fn clone(&self) -> Self {
        Entry {
            shared: self.shared.clone(),
            reg: self.reg.clone(),
        }
    }
}

impl<S: AddressSpace, R: Registrar> Drop for Entry<S, R> {
    fn drop(&mut self) {
        if let Some(reg) = self.reg.take() {
            self.shared.put(reg);
        }
    }
}

impl<S: AddressSpace, R: Registrar> fmt::Debug for Entry<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.reg();
        f.debug_struct("Entry")
            .field("id", &r.id)
            .field("start", &format_args!("{:#x}", r.start))
            .field("end", &format_args!("{:#x}", r.end))
            .field("access", &r.access)
            .field("valid", &r.is_valid())
            .finish()
    }
}

/// A lock-free hit ([`RegCache::with_hit`](crate::RegCache::with_hit)): the
/// registration, borrowed for the closure it is passed to.
///
/// [`start`](Self::start), [`end`](Self::end) and [`key`](Self::key) come
/// from the hit table's slot, which the lookup has already read; the other
/// methods read the registration itself (with many registrations, a cache
/// miss of its own).
pub struct Hit<'a, S: AddressSpace, R: Registrar> {
    pub(crate) shared: &'a Arc<CacheState<S, R>>,
    pub(crate) slot: &'a SlotView<'a, Reg<S, R>>,
}

impl<'a, S: AddressSpace, R: Registrar> Hit<'a, S, R> {
    fn reg(&self) -> &'a Reg<S, R> {
        self.slot.get()
    }

    /// The device's handle of the registration.
    pub fn handle(&self) -> &'a R::Handle {
        &self.reg().handle
    }

    /// The device's hit key of the handle ([`Registrar::hit_key`]), kept
    /// in the hit table: read without touching the registration.
    pub fn key(&self) -> u64 {
        crate::hits::view_key(self.slot)
    }

    /// Unique id of the registration (as [`Entry::id`]).
    pub fn id(&self) -> u64 {
        self.reg().id
    }

    /// First byte registered.
    pub fn start(&self) -> u64 {
        self.slot.key()
    }

    /// One past the last byte registered.
    pub fn end(&self) -> u64 {
        crate::hits::view_end(self.slot)
    }

    /// A guard that keeps the registration after the closure returns (two
    /// reference-count increments).
    pub fn entry(&self) -> Entry<S, R> {
        Entry {
            shared: self.shared.clone(),
            reg: Some(self.slot.value().to_arc()),
        }
    }
}

impl<S: AddressSpace, R: Registrar> fmt::Debug for Hit<'_, S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hit")
            .field("id", &self.id())
            .field("start", &format_args!("{:#x}", self.start()))
            .field("end", &format_args!("{:#x}", self.end()))
            .finish()
    }
}
