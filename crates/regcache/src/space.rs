//! [`AddressSpace`]: what the cache needs from the memory it registers.

use mmu_notifier::SubscriptionsRef;

/// The primary address space a [`RegCache`](crate::RegCache) keeps its
/// registrations coherent with: its [`SubscriptionsRef`] (where the cache
/// inserts one interval notifier per registration), a way to make sure
/// invalidations of a range are delivered at all, and a flush that makes
/// every change that already took effect visible.
///
/// Implemented by this process's address space (the `uffd` crate's
/// `ProcessMm`) and by the software MMU (`softmm::MmGrab`, with softmm's
/// `regcache` feature); a kernel or hypervisor implements it over its own
/// page tables, where `watch` and `flush` have nothing to do.
pub trait AddressSpace: Send + Sync + 'static {
    /// Kept for as long as an interval notifier over a range is inserted:
    /// whatever the address space needs to deliver invalidations for that
    /// range (nothing where the primary calls every hook itself; the
    /// userfaultfd registration for a real process).
    type Watch: Send + Sync + 'static;

    /// Why [`watch`](Self::watch) or [`flush`](Self::flush) failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The address space's subscriptions.
    fn subscriptions(&self) -> &SubscriptionsRef;

    /// Starts delivering invalidations for `[start, start + len)`; they stop
    /// when the returned value is dropped (and no other watch covers the
    /// range).
    ///
    /// # Errors
    /// The address space cannot observe that range (not mapped, a kind of
    /// memory it cannot watch, or it is gone).
    fn watch(&self, start: u64, len: u64) -> Result<Self::Watch, Self::Error>;

    /// Waits until the invalidation of every change that has taken effect
    /// has been delivered, so that a lookup made after this call cannot
    /// return a registration of memory that is no longer mapped the same
    /// way. A primary whose hooks run inside the change itself (Linux, the
    /// software MMU) has nothing to wait for.
    ///
    /// # Errors
    /// The address space can no longer deliver invalidations.
    fn flush(&self) -> Result<(), Self::Error> {
        Ok(())
    }
}
