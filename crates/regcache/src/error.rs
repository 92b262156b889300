//! [`CacheError`]: why a lookup returned no registration.

use crate::registrar::BoxError;

/// Why [`RegCache::get`](crate::RegCache::get) returned no registration.
/// [`fall_back`](CacheError::fall_back) says whether doing the I/O without
/// a registration is the right reaction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Bad arguments: an empty or overflowing range, or no access flag.
    #[error("invalid request {start:#x}+{len:#x} ({why})")]
    InvalidRequest {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The device cannot register this memory, or the request is longer
    /// than the device allows: do the I/O without a registration.
    #[error("the device cannot register {start:#x}+{len:#x}: {source}")]
    Unsupported {
        /// Start of the (aligned) range.
        start: u64,
        /// Length of the (aligned) range.
        len: u64,
        /// The device's reason.
        #[source]
        source: BoxError,
    },
    /// The address space cannot watch this range (not mapped, memory it
    /// cannot observe, or it is gone): it cannot be cached safely.
    #[error("the address space cannot watch this range, so it cannot be cached: {source}")]
    Unwatchable {
        /// Start of the (aligned) range.
        start: u64,
        /// Length of the (aligned) range.
        len: u64,
        /// The address space's reason.
        #[source]
        source: BoxError,
    },
    /// The device stayed out of resources after the cache deregistered
    /// everything nobody holds and retried once: too many registrations are
    /// held by guards. Drop guards sooner, or do this I/O without one.
    #[error("the device is out of registration resources ({source})")]
    Exhausted {
        /// The device's last error, or the cache's own limit check.
        #[source]
        source: BoxError,
    },
    /// The range kept being invalidated while it was being registered
    /// (the cache retried a bounded number of times).
    #[error("gave up after {attempts} registrations raced by invalidations")]
    Busy {
        /// Registrations made and thrown away.
        attempts: u32,
    },
    /// The device failed for another reason.
    #[error(transparent)]
    Device(BoxError),
    /// The flush of the address space failed (it can no longer deliver
    /// invalidations, for example in a forked child).
    #[error("the address space cannot deliver invalidations: {0}")]
    AddressSpace(#[source] BoxError),
    /// The subsystem refused the interval notifier (the address space
    /// exited).
    #[error(transparent)]
    Notifier(#[from] mmu_notifier::Error),
}

impl CacheError {
    /// True when the caller should do this I/O without a registration
    /// ([`Unsupported`](Self::Unsupported), [`Unwatchable`](Self::Unwatchable),
    /// [`Exhausted`](Self::Exhausted), [`Busy`](Self::Busy)) rather than
    /// report a failure.
    pub fn fall_back(&self) -> bool {
        matches!(
            self,
            CacheError::Unsupported { .. }
                | CacheError::Unwatchable { .. }
                | CacheError::Exhausted { .. }
                | CacheError::Busy { .. }
        )
    }
}
