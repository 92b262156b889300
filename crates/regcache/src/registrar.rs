//! [`Registrar`]: the device side of the cache.

use crate::Access;

/// A boxed error from a device or an address space.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`Registrar`] could not register a range, saying what the caller
/// should do about it.
#[derive(Debug, thiserror::Error)]
pub enum RegError {
    /// The device cannot register this memory at all (a file mapping the
    /// device refuses, a range above its limits). The cache passes it on as
    /// [`CacheError::Unsupported`](crate::CacheError::Unsupported): do the
    /// I/O without a registration.
    #[error("the device cannot register this memory: {0}")]
    Unsupported(#[source] BoxError),
    /// The device is out of a resource (slots, memory keys, pinnable
    /// memory: ENOMEM). The cache deregisters what nobody uses and retries
    /// once before it gives up with
    /// [`CacheError::Exhausted`](crate::CacheError::Exhausted).
    #[error("the device is out of registration resources: {0}")]
    Exhausted(#[source] BoxError),
    /// Anything else; passed on as
    /// [`CacheError::Device`](crate::CacheError::Device).
    #[error("registration failed: {0}")]
    Other(#[source] BoxError),
}

impl RegError {
    /// An [`Unsupported`](RegError::Unsupported) error with a message.
    pub fn unsupported(msg: impl Into<BoxError>) -> Self {
        RegError::Unsupported(msg.into())
    }

    /// An [`Exhausted`](RegError::Exhausted) error with a message.
    pub fn exhausted(msg: impl Into<BoxError>) -> Self {
        RegError::Exhausted(msg.into())
    }

    /// An [`Other`](RegError::Other) error.
    pub fn other(e: impl Into<BoxError>) -> Self {
        RegError::Other(e.into())
    }
}

/// What a device can hold at once. The cache counts every live device
/// handle against these, including handles of registrations that left the
/// cache but are still held by a guard, and makes room (deregistering
/// registrations nobody holds, least recently used first) before it asks
/// the device for more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Live handles at most (io_uring: table slots; RDMA: memory keys).
    pub max_handles: usize,
    /// Registered bytes at most (pinned memory, `RLIMIT_MEMLOCK`).
    pub max_bytes: u64,
    /// Bytes in one registration at most (io_uring: 1 GiB). A longer request
    /// is [`CacheError::Unsupported`](crate::CacheError::Unsupported).
    pub max_len: u64,
}

impl Limits {
    /// No limit of the cache's own: the device reports exhaustion itself.
    pub const NONE: Limits = Limits {
        max_handles: usize::MAX,
        max_bytes: u64::MAX,
        max_len: u64::MAX,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::NONE
    }
}

/// The device: registers ranges of the address space for device access and
/// deregisters them (`ibv_reg_mr` / `ibv_dereg_mr`, an io_uring fixed-buffer
/// slot, `cudaHostRegister`, a VFIO DMA map). UCX calls this
/// `ucs_rcache_ops_t`, libfabric its MR cache's `add_region` /
/// `delete_region`.
///
/// The cache guarantees, for every handle `register` returned:
/// * `deregister` is called exactly once, after the registration left the
///   cache (invalidated, evicted, raced by an invalidation while it was
///   being made, or the cache dropped) and after the last
///   [`Entry`](crate::Entry) guard of it was dropped;
/// * never from inside a notifier callback (so never on a userfaultfd
///   monitor thread) and never while the cache's lock is held: `deregister`
///   may sleep, and may take the application's locks.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use regcache::{Access, RegError, Registrar};
///
/// /// A device that hands out memory keys.
/// struct Nic { next_key: AtomicU64 }
///
/// impl Registrar for Nic {
///     type Handle = u64; // the memory key
///     fn register(&self, start: u64, end: u64, access: Access) -> Result<u64, RegError> {
///         // ibv_reg_mr(pd, start, end - start, access) here
///         Ok(self.next_key.fetch_add(1, Ordering::Relaxed))
///     }
///     fn deregister(&self, key: u64) -> Result<(), RegError> {
///         Ok(()) // ibv_dereg_mr here
///     }
/// }
/// ```
pub trait Registrar: Send + Sync + 'static {
    /// What the device returns for one registration (a memory region, a
    /// slot index); the user reads it from the [`Entry`](crate::Entry).
    type Handle: Send + Sync + 'static;

    /// Registers `[start, end)` (as returned by [`align`](Self::align)) for
    /// `access`. May sleep and fault the pages in.
    ///
    /// # Errors
    /// [`RegError`], saying whether the caller should fall back, make room,
    /// or give up.
    fn register(&self, start: u64, end: u64, access: Access) -> Result<Self::Handle, RegError>;

    /// Releases a handle. Called exactly once per handle; see the trait docs
    /// for when.
    ///
    /// # Errors
    /// Reported to the cache's counters and as a `tracing` warning; the
    /// handle counts as released either way.
    fn deregister(&self, handle: Self::Handle) -> Result<(), RegError>;

    /// The range to register for a request of `[start, end)` (already whole
    /// pages): it must contain the request and be page aligned. Whole pages
    /// by default; a GPU may want 64 KiB or 2 MiB.
    fn align(&self, start: u64, end: u64) -> (u64, u64) {
        (start, end)
    }

    /// The device's limits (none by default).
    fn limits(&self) -> Limits {
        Limits::NONE
    }

    /// A word standing for `handle` in the lock-free hit path (an RDMA
    /// memory key, a fixed-buffer index): the cache keeps it in the hit
    /// table's slot, where [`Hit::key`](crate::Hit::key) reads it without
    /// touching the registration itself, which with many registrations is
    /// a second, dependent cache miss. 0 by default.
    fn hit_key(&self, handle: &Self::Handle) -> u64 {
        let _ = handle;
        0
    }
}
