//! An embedding of `mmu-notifier` without std, the way a Rust kernel or a
//! bare-metal hypervisor would use it: this crate is `#![no_std]` (with
//! `alloc`) and depends on `mmu-notifier` with `default-features = false`.
//!
//! * [`Cpus`] is the SRCU backend: one reader per CPU, registered by hand
//!   when the CPU is brought up ([`Cpus::bring_up`]); the embedder's
//!   `current_cpu` function says which CPU runs; waiting is a spin-wait
//!   that counts its rounds. It also keeps each CPU's context of the
//!   subsystem's debug checks (a `ContextSource`).
//! * [`ShadowMmu`] is a KVM-style secondary MMU: a shadow page table under a
//!   spin lock, dropping translations in `invalidate_range_start` and on
//!   `release`.
//! * [`drive`] runs register → fault → invalidate → unregister →
//!   synchronize on one address space and reports what happened.
#![no_std]
#![forbid(missing_docs)]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicUsize, Ordering};

use mmu_notifier::debug::{ContextSource, DebugContext};
use mmu_notifier::srcu::{Backend, Domain, Reader};
use mmu_notifier::{Again, Callbacks, Error, Event, MmuNotifier, Range, Subscriptions, PAGE_SIZE};

/// Most CPUs [`Cpus`] supports.
pub const MAX_CPUS: usize = 16;

/// The SRCU backend of a small kernel: a reader per CPU and a spin-wait.
///
/// A reader per CPU is right only where read-side sections are not
/// preempted or migrated: here the "CPUs" are the threads of the tests, each
/// with its own id, which never share a reader.
pub struct Cpus {
    /// Which CPU the caller runs on (an embedder reads its per-CPU area).
    current_cpu: fn() -> usize,
    readers: [spin::Once<&'static Reader>; MAX_CPUS],
    /// Each CPU's context of the subsystem's debug checks.
    contexts: [DebugContext; MAX_CPUS],
    /// Rounds spent waiting for another CPU (grace periods, barriers).
    relaxed: AtomicUsize,
}

impl Cpus {
    /// A backend whose CPU ids come from `current_cpu`.
    pub const fn new(current_cpu: fn() -> usize) -> Cpus {
        Cpus {
            current_cpu,
            readers: [const { spin::Once::new() }; MAX_CPUS],
            contexts: [const { DebugContext::new() }; MAX_CPUS],
            relaxed: AtomicUsize::new(0),
        }
    }

    /// Brings CPU `id` up: registers its SRCU reader in `domain`.
    ///
    /// # Errors
    /// `Err(id)` for an id of [`MAX_CPUS`] or more.
    pub fn bring_up(&self, id: usize, domain: &'static Domain) -> Result<(), usize> {
        let slot = self.readers.get(id).ok_or(id)?;
        slot.call_once(|| domain.register_reader());
        Ok(())
    }

    /// Rounds spent waiting so far.
    pub fn relaxed(&self) -> usize {
        self.relaxed.load(Ordering::Relaxed)
    }
}

// SAFETY: `reader` returns the reader registered for the calling CPU (one
// `bring_up` per id, on `domain`); each CPU id is used by one context at a
// time (the contract of `current_cpu`, kept by the tests: one thread per
// id), and sections are not migrated between CPUs.
unsafe impl Backend for Cpus {
    fn reader(&self, _domain: &'static Domain) -> &'static Reader {
        let id = (self.current_cpu)();
        match self.readers.get(id).and_then(spin::Once::get) {
            Some(r) => r,
            // Reading on a CPU that was never brought up is a kernel bug.
            None => panic!("CPU {id} reads before it was brought up"),
        }
    }

    fn relax(&self) {
        self.relaxed.fetch_add(1, Ordering::Relaxed);
        core::hint::spin_loop();
    }
}

/// Where the subsystem's debug checks (`might_sleep` in a non-blockable
/// callback, recursion into the invalidate path) keep their state: per CPU,
/// like the readers. Installed with `mmu_notifier::debug::set_context_source`.
impl ContextSource for Cpus {
    fn current(&self) -> Option<&DebugContext> {
        self.contexts.get((self.current_cpu)())
    }
}

/// A shadow page table (guest page → host frame) kept coherent by the
/// notifier callbacks, under a spin lock.
#[derive(Default)]
pub struct ShadowMmu {
    table: spin::Mutex<BTreeMap<u64, u64>>,
    /// Pages dropped by invalidations.
    pub zapped: AtomicUsize,
    /// `release` calls.
    pub released: AtomicUsize,
}

impl ShadowMmu {
    /// Installs a translation (a "fault").
    pub fn map(&self, page: u64, frame: u64) {
        self.table.lock().insert(page, frame);
    }

    /// Translations currently held.
    pub fn mapped(&self) -> usize {
        self.table.lock().len()
    }
}

impl MmuNotifier for ShadowMmu {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::RELEASE
    }

    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        let mut t = self.table.lock();
        let before = t.len();
        t.retain(|&page, _| page < r.start() || page >= r.end());
        self.zapped.fetch_add(before - t.len(), Ordering::Relaxed);
        Ok(())
    }

    fn release(&self) {
        self.table.lock().clear();
        self.released.fetch_add(1, Ordering::Relaxed);
    }
}

/// What [`drive`] observed.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// Translations left after invalidating half of them.
    pub mapped_after_invalidate: usize,
    /// Pages the invalidation dropped.
    pub zapped: usize,
    /// `release` calls (unregister calls it once).
    pub released: usize,
    /// Translations left after unregister.
    pub mapped_after_unregister: usize,
    /// Deferred functions of the domain left after the barrier.
    pub pending_after_barrier: usize,
}

/// Registers a shadow MMU on a new address space of `domain`, maps `pages`
/// pages, invalidates the first half, unregisters, and waits for the
/// domain's deferred work (Linux `mmu_notifier_synchronize`).
///
/// # Errors
/// The subsystem's errors (none are expected).
pub fn drive(domain: &'static Domain, pages: u64) -> Result<Report, Error> {
    let mm = Subscriptions::with_domain(domain);
    let shadow = Arc::new(ShadowMmu::default());
    let handle = mm.register(shadow.clone())?;
    for p in 0..pages {
        shadow.map(p * PAGE_SIZE, p + 1000);
    }
    let half = Range::new(0, pages / 2 * PAGE_SIZE, Event::Unmap)?;
    mm.invalidate_range_start(half).end();
    let mapped_after_invalidate = shadow.mapped();
    mm.unregister(&handle)?;
    domain.barrier()?;
    Ok(Report {
        mapped_after_invalidate,
        zapped: shadow.zapped.load(Ordering::Relaxed),
        released: shadow.released.load(Ordering::Relaxed),
        mapped_after_unregister: shadow.mapped(),
        pending_after_barrier: domain.pending(),
    })
}
