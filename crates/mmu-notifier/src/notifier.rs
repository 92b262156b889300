//! The classic notifier: the `MmuNotifier` ops trait (Linux
//! `struct mmu_notifier_ops`) and what the core knows about each notifier.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::ops::BitOr;

use crate::{Range, SubscriptionsRef};

/// A non-blockable invalidation could not proceed without sleeping (Linux
/// `-EAGAIN`). The only error `invalidate_range_start` may return, and only
/// for non-blockable ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("would have to sleep in a non-blockable invalidation (EAGAIN)")]
pub struct Again;

/// The new value a primary PTE gets in `change_pte` (Linux passes the raw
/// `pte_t`; we pass what a secondary needs to map it directly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PteValue {
    /// Page frame number the PTE points at.
    pub pfn: u64,
    /// Whether the PTE allows writes.
    pub writable: bool,
}

/// Which optional callbacks a notifier implements (Linux checks the ops
/// table for NULL pointers). Rules depend on it, so it is declared, not
/// guessed: a callback not declared here is never called.
///
/// ```
/// use mmu_notifier::Callbacks;
/// let kvm = Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END | Callbacks::RELEASE;
/// assert!(kvm.contains(Callbacks::RELEASE));
/// assert!(!kvm.contains(Callbacks::CHANGE_PTE));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Callbacks(u16);

impl Callbacks {
    /// No callbacks.
    pub const NONE: Callbacks = Callbacks(0);
    /// [`MmuNotifier::release`].
    pub const RELEASE: Callbacks = Callbacks(1 << 0);
    /// [`MmuNotifier::clear_flush_young`].
    pub const CLEAR_FLUSH_YOUNG: Callbacks = Callbacks(1 << 1);
    /// [`MmuNotifier::clear_young`].
    pub const CLEAR_YOUNG: Callbacks = Callbacks(1 << 2);
    /// [`MmuNotifier::test_young`].
    pub const TEST_YOUNG: Callbacks = Callbacks(1 << 3);
    /// [`MmuNotifier::change_pte`].
    pub const CHANGE_PTE: Callbacks = Callbacks(1 << 4);
    /// [`MmuNotifier::invalidate_range_start`].
    pub const INVALIDATE_RANGE_START: Callbacks = Callbacks(1 << 5);
    /// [`MmuNotifier::invalidate_range_end`].
    pub const INVALIDATE_RANGE_END: Callbacks = Callbacks(1 << 6);
    /// [`MmuNotifier::arch_invalidate_secondary_tlbs`].
    pub const ARCH_INVALIDATE_SECONDARY_TLBS: Callbacks = Callbacks(1 << 7);
    /// Not a callback: declares that `invalidate_range_start` may return
    /// [`Again`] in non-blockable ranges. Such a notifier must not have
    /// `invalidate_range_end` (Linux commit c2655835); registration refuses it.
    pub const START_MAY_FAIL: Callbacks = Callbacks(1 << 8);

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Callbacks) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: Callbacks) -> bool {
        self.0 & other.0 != 0
    }

    /// Union of two sets.
    pub const fn union(self, other: Callbacks) -> Callbacks {
        Callbacks(self.0 | other.0)
    }
}

impl BitOr for Callbacks {
    type Output = Callbacks;
    fn bitor(self, rhs: Callbacks) -> Callbacks {
        self.union(rhs)
    }
}

/// The callbacks of a classic (list) notifier.
///
/// Every callback has a no-op default; [`MmuNotifier::callbacks`] says which
/// ones the notifier really implements, and only those are called. All run
/// inside an SRCU read-side section ([`crate::srcu`]), so none may call
/// [`SubscriptionsRef::unregister`] or `synchronize` (they return
/// [`crate::Error::WouldDeadlock`] there); `release` may call
/// [`SubscriptionsRef::put`].
///
/// Every callback has one shape: `&self` and what it acts on (a [`Range`]
/// for the invalidations, `start`/`end` or an address for the aging and
/// TLB calls, an address and the new PTE for `change_pte`). None receives
/// the address space (Linux passes the `mm` to some and not others): a
/// notifier that needs it keeps a [`SubscriptionsRef`], as
/// [`NotifierAlloc::alloc_notifier`] is given one to keep.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use mmu_notifier::{Again, Callbacks, MmuNotifier, Range};
///
/// /// A secondary MMU that just counts invalidations in flight.
/// struct Counter(AtomicUsize);
/// impl MmuNotifier for Counter {
///     fn callbacks(&self) -> Callbacks {
///         Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
///     }
///     fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
///         self.0.fetch_add(1, Ordering::SeqCst);
///         Ok(())
///     }
///     fn invalidate_range_end(&self, _r: &Range) {
///         self.0.fetch_sub(1, Ordering::SeqCst);
///     }
/// }
/// ```
pub trait MmuNotifier: Send + Sync + 'static {
    /// Which callbacks below are implemented.
    fn callbacks(&self) -> Callbacks;

    /// The address space is going away (exit), or the notifier is being
    /// unregistered: tear down every secondary mapping and stop creating new
    /// ones. Runs before any page of the address space is freed. Unlike Linux,
    /// this crate calls it **exactly once** per notifier, even when unregister
    /// races with exit.
    fn release(&self) {}

    /// Test and clear the accessed bit of `[start, end)` and flush the
    /// secondary TLB. Results are ORed over all notifiers; every one is called.
    /// Must not sleep (runs under the primary's page-table lock).
    fn clear_flush_young(&self, _start: u64, _end: u64) -> bool {
        false
    }

    /// Like `clear_flush_young` without the flush (page_idle, DAMON).
    fn clear_young(&self, _start: u64, _end: u64) -> bool {
        false
    }

    /// Test the accessed bit of `address` without clearing it. The first
    /// notifier (newest first) returning true wins; the rest are not called.
    fn test_young(&self, _address: u64) -> bool {
        false
    }

    /// The PTE for `address` is about to be set to `pte` (COW, KSM); always
    /// inside an invalidate_range_start/end pair. Must not sleep.
    fn change_pte(&self, _address: u64, _pte: PteValue) {}

    /// PTEs in `range` are about to change: stop creating secondary mappings
    /// there and drop the existing ones **before returning**. Dropping them
    /// in [`invalidate_range_end`](Self::invalidate_range_end) is too late:
    /// between the two the primary may already have freed pages (a munmap
    /// frees full mmu_gather batches before `end`) or replaced them (a COW
    /// fault, swap-out, migration), and a secondary still using its mapping
    /// would read or write a page the process no longer maps. (A secondary
    /// whose TLB shares the CPU page tables uses
    /// [`arch_invalidate_secondary_tlbs`](Self::arch_invalidate_secondary_tlbs)
    /// instead.) May sleep only if `range.blockable()`; otherwise return
    /// [`Again`] instead of sleeping (declare [`Callbacks::START_MAY_FAIL`]).
    fn invalidate_range_start(&self, _range: &Range) -> Result<(), Again> {
        Ok(())
    }

    /// The PTE changes announced by the matching start are done; the pages may
    /// already be freed. Secondary mappings of the range may be created again
    /// from now on (a KVM-style in-progress count drops here). Called only
    /// for a start this notifier received.
    fn invalidate_range_end(&self, _range: &Range) {}

    /// For TLBs that share the CPU page tables (IOMMU SVA, ATS): invalidate
    /// `[start, end)` (`end` may be `u64::MAX`: everything) whenever the CPU
    /// TLB is. Must not sleep. Exclusive with start/end (Linux 1af5a810).
    fn arch_invalidate_secondary_tlbs(&self, _start: u64, _end: u64) {}
}

/// Allocation side of the get/put lifetime (Linux `alloc_notifier` /
/// `free_notifier`). The identity of the `Arc<dyn NotifierAlloc>` handed to
/// [`SubscriptionsRef::get`] is the key: one notifier per (address space, ops).
pub trait NotifierAlloc: Send + Sync + 'static {
    /// Creates the per-address-space notifier; called with the mmap write lock
    /// held.
    ///
    /// # Errors
    /// Any error; it is passed up by `get` as [`crate::Error::Alloc`].
    fn alloc_notifier(
        &self,
        mm: &SubscriptionsRef,
    ) -> Result<Arc<dyn MmuNotifier>, Box<dyn core::error::Error + Send + Sync>>;

    /// Frees a notifier after its last `put`, once no callback of it is
    /// running or can start (from a deferred SRCU function), or synchronously
    /// if its registration failed. The default just drops it.
    fn free_notifier(&self, notifier: Arc<dyn MmuNotifier>) {
        drop(notifier);
    }
}
