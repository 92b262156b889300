//! Errors of the software MMU's operations (the `-E…` values Linux returns).

/// Why an operation on an [`Mm`](crate::Mm) failed. Bad input never panics
/// and never leaves the address space half changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An address or length is not page-aligned, is zero where a length is
    /// required, or `addr + len` overflows (Linux `-EINVAL`).
    #[error("invalid range: addr {addr:#x}, len {len:#x} (unaligned, empty or overflowing)")]
    InvalidRange {
        /// The address given.
        addr: u64,
        /// The length given.
        len: u64,
    },
    /// Part of the range has no VMA, or the VMA kind does not support the
    /// operation (Linux `-ENOMEM` for mprotect/mremap holes, `-EINVAL` for
    /// madvise FREE on shared memory).
    #[error("no suitable mapping at {addr:#x}: {why}")]
    NotMapped {
        /// First address that was not suitable.
        addr: u64,
        /// What was wrong with it.
        why: &'static str,
    },
    /// The access is not allowed by the VMA's protection (SIGSEGV for a CPU
    /// access, `-EFAULT` from range_fault, `-EPERM` for a write request on a
    /// read-only VMA).
    #[error("{access} access at {addr:#x} not allowed by the mapping's protection")]
    Protection {
        /// Faulting address.
        addr: u64,
        /// `"read"` or `"write"`.
        access: &'static str,
    },
    /// No free frame (Linux `-ENOMEM` / VM_FAULT_OOM).
    #[error("out of physical frames")]
    OutOfMemory,
    /// No free virtual address range of the requested size.
    #[error("no free virtual address range of {len:#x} bytes")]
    NoAddressSpace {
        /// Length asked for.
        len: u64,
    },
    /// The address space has exited (its last user went away).
    #[error("the address space has exited")]
    Exited,
    /// The OOM reaper took this address space's memory; it is unstable and
    /// every fault fails (Linux MMF_UNSTABLE gives SIGBUS).
    #[error("the address space was reaped by the OOM killer")]
    OomReaped,
    /// A frame handle refers to a frame that has been freed since (its
    /// generation changed).
    #[error("stale frame handle: pfn {pfn}, generation {gen} (frame was freed)")]
    StaleFrame {
        /// Frame number.
        pfn: u64,
        /// Generation in the handle.
        gen: u64,
    },
    /// `range_fault` collided with an invalidation (Linux `-EBUSY`): take a
    /// new `read_begin` sequence and retry.
    #[error("range_fault collided with an invalidation; retry with a new sequence")]
    Busy,
    /// The handle was already released (double unpin).
    #[error("the pin was already released")]
    AlreadyUnpinned,
    /// An `HmmRange` whose interval notifier belongs to another address
    /// space than the mmap lock it was walked under.
    #[error("the range's interval notifier belongs to a different address space")]
    ForeignNotifier,
    /// An error from the MMU-notifier subsystem (registration on this
    /// address space).
    #[error("mmu notifier: {0}")]
    Notifier(String),
}

impl From<mmu_notifier::Error> for Error {
    fn from(e: mmu_notifier::Error) -> Self {
        Error::Notifier(e.to_string())
    }
}

/// Result of a software-MMU operation.
pub type Result<T> = std::result::Result<T, Error>;
