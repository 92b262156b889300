//! Errors of the subsystem's API.

use alloc::boxed::Box;

use crate::range::RangeError;

/// Why an operation of this crate failed. Every misuse the kernel would BUG
/// or WARN on, or that would deadlock, is one of these instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The range given was not valid.
    #[error("invalid range: {0}")]
    InvalidRange(#[from] RangeError),
    /// The address space has exited (its `release` ran); nothing can be
    /// registered on it any more.
    #[error("the address space has exited; nothing can be registered on it")]
    AddressSpaceExited,
    /// `release` (exit) was already run on this address space.
    #[error("release (exit) already ran on this address space")]
    AlreadyReleased,
    /// The notifier is no longer registered: unregistered or finally put.
    #[error("the notifier is not registered (already unregistered or put)")]
    NotRegistered,
    /// `put` would take the reference count below zero.
    #[error("put on a notifier whose reference count is already zero")]
    PutUnderflow,
    /// `get` found the notifier's reference count at `u32::MAX`
    /// (Linux `-EOVERFLOW`).
    #[error("get: reference count would overflow")]
    RefcountOverflow,
    /// A handle of another address space was passed.
    #[error("the handle belongs to a different address space")]
    WrongAddressSpace,
    /// A notifier with `arch_invalidate_secondary_tlbs` also has
    /// `invalidate_range_start` or `_end` (Linux 1af5a810, `-EINVAL`).
    #[error(
        "a notifier with arch_invalidate_secondary_tlbs must not have invalidate_range_start/end"
    )]
    SecondaryTlbWithStartEnd,
    /// A notifier whose start may fail also has `invalidate_range_end`
    /// (Linux c2655835).
    #[error("a notifier whose invalidate_range_start may fail must not have invalidate_range_end")]
    FailingStartWithEnd,
    /// A notifier obtained with `get` was passed to `unregister`; use `put`.
    #[error("notifier was obtained with get(); release it with put(), not unregister()")]
    ManagedByGetPut,
    /// The named operation waits for a grace period or for the mmap lock and
    /// was called from a notifier callback (an SRCU read-side section) or a
    /// deferred free, where that wait could never end.
    #[error("{0} called from a notifier callback or deferred free would deadlock")]
    WouldDeadlock(&'static str),
    /// An interval notifier's length is zero or `start + length - 1`
    /// overflows (Linux `-EOVERFLOW`).
    #[error("invalid interval: start {start:#x}, length {length:#x} (empty or overflows)")]
    InvalidInterval {
        /// The start given.
        start: u64,
        /// The length given.
        length: u64,
    },
    /// `alloc_notifier` failed during `get`.
    #[error("alloc_notifier failed: {0}")]
    Alloc(Box<dyn core::error::Error + Send + Sync>),

    /// An SRCU reader was given back while inside a read-side section, or to
    /// a domain it does not belong to.
    #[error("the SRCU reader is inside a read-side section or belongs to another domain")]
    ReaderBusy,
    /// [`debug::set_context_source`](crate::debug::set_context_source) was
    /// called again; the first source stays installed.
    #[error("a debug context source is already installed")]
    ContextSourceSet,
}
