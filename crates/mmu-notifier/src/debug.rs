//! Lockdep-style checks for the classic mistakes, and the counters that make
//! every kernel `WARN` of the subsystem observable.
//!
//! * Blocking inside a non-blockable invalidation (Linux ba170f76): the core
//!   marks every callback of a non-blockable range as a "no sleeping" section;
//!   [`might_sleep`], which every blocking primitive of this crate calls,
//!   reports a [`Warning::SleepInNonBlockable`] there.
//! * Recursion into the invalidate path of the same address space from one of
//!   its callbacks (what the lockdep map of 23b68395 catches) is reported as
//!   [`Warning::Recursion`]; operations that would wait for the running
//!   invalidation return [`crate::Error::WouldDeadlock`] instead of hanging.
//! * A start failing in a blockable range (8402ce61), a failing start on a
//!   notifier with an end callback (c2655835), a panicking callback and a put
//!   below zero are counted too.
//!
//! "Reported" means a `tracing` warning plus a per-address-space counter
//! ([`Diagnostics`]). The sleep and recursion checks exist only in debug
//! builds (`debug_assertions`) with the `std` feature, whose thread-locals
//! hold the per-thread context they need; elsewhere [`might_sleep`] and the
//! section markers compile to nothing (the counted warnings stay).

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

/// Shared handle to an address space's counters (kept by thread-local debug
/// context while its callbacks run).
pub(crate) type DiagHandle = Arc<Diagnostics>;

/// A diagnostic the subsystem reports (a kernel `WARN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Warning {
    /// A callback slept (called [`might_sleep`] or took a blocking primitive of
    /// this crate) inside a non-blockable range (debug builds).
    SleepInNonBlockable,
    /// A callback re-entered the invalidate path of its own address space
    /// (debug builds).
    Recursion,
    /// `invalidate_range_start` failed although the range was blockable.
    BlockableStartFailed,
    /// A notifier that has `invalidate_range_end` failed its start.
    FailingStartHasEnd,
    /// A notifier returned `Again` without declaring `START_MAY_FAIL`.
    UndeclaredStartFailure,
    /// A callback panicked; the panic was caught and the address space stays
    /// usable.
    CallbackPanicked,
    /// `put` on a notifier whose reference count is already zero.
    PutUnderflow,
    /// Registration of a notifier mixing `arch_invalidate_secondary_tlbs` with
    /// start/end (refused).
    SecondaryTlbWithStartEnd,
}

impl Warning {
    const COUNT: usize = 8;

    fn index(self) -> usize {
        match self {
            Warning::SleepInNonBlockable => 0,
            Warning::Recursion => 1,
            Warning::BlockableStartFailed => 2,
            Warning::FailingStartHasEnd => 3,
            Warning::UndeclaredStartFailure => 4,
            Warning::CallbackPanicked => 5,
            Warning::PutUnderflow => 6,
            Warning::SecondaryTlbWithStartEnd => 7,
        }
    }
}

/// Per-address-space diagnostic counters, readable by tests.
///
/// ```
/// use mmu_notifier::{Subscriptions, Warning};
/// let mm = Subscriptions::new();
/// assert_eq!(mm.diagnostics().count(Warning::Recursion), 0);
/// ```
#[derive(Debug, Default)]
pub struct Diagnostics {
    counts: [AtomicU64; Warning::COUNT],
}

impl Diagnostics {
    /// How many times `w` was reported.
    pub fn count(&self, w: Warning) -> u64 {
        self.counts[w.index()].load(Ordering::Relaxed)
    }

    /// How many warnings of any kind were reported.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Counts `w` and emits a `tracing` warning with `detail`.
    pub(crate) fn report(&self, w: Warning, detail: &str) {
        self.counts[w.index()].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(warning = ?w, "mmu_notifier: {detail}");
    }
}

#[cfg(all(debug_assertions, feature = "std"))]
#[derive(Default)]
struct Context {
    /// Diagnostics of the address spaces whose non-blockable callbacks are
    /// running on this thread, innermost last.
    non_block: alloc::vec::Vec<Arc<Diagnostics>>,
    /// Address spaces whose invalidate path this thread is inside.
    invalidating: alloc::vec::Vec<u64>,
}

#[cfg(all(debug_assertions, feature = "std"))]
crate::sync::thread_local! {
    static CONTEXT: std::cell::RefCell<Context> = std::cell::RefCell::new(Context::default());
}

/// Declares that the caller may sleep here (Linux `might_sleep`). Inside a
/// non-blockable invalidation callback this reports
/// [`Warning::SleepInNonBlockable`] on that address space (debug builds only;
/// free in release builds). Call it in your own blocking paths that callbacks
/// may reach.
#[inline]
pub fn might_sleep() {
    #[cfg(all(debug_assertions, feature = "std"))]
    {
        let diag = CONTEXT
            .try_with(|c| c.borrow().non_block.last().cloned())
            .ok()
            .flatten();
        if let Some(d) = diag {
            d.report(
                Warning::SleepInNonBlockable,
                "sleeping function called from a non-blockable invalidation callback",
            );
        }
    }
}

/// Marks a non-blockable callback section (Linux `non_block_start/end`);
/// the section ends when the value is dropped.
pub(crate) struct NonBlockSection {
    #[cfg(all(debug_assertions, feature = "std"))]
    active: bool,
}

impl NonBlockSection {
    #[inline]
    #[cfg_attr(not(all(debug_assertions, feature = "std")), allow(unused_variables))]
    pub(crate) fn enter(diag: &DiagHandle, active: bool) -> NonBlockSection {
        #[cfg(all(debug_assertions, feature = "std"))]
        {
            if active {
                let d = diag.clone();
                CONTEXT.with(|c| c.borrow_mut().non_block.push(d));
            }
            NonBlockSection { active }
        }
        #[cfg(not(all(debug_assertions, feature = "std")))]
        NonBlockSection {}
    }
}

impl Drop for NonBlockSection {
    #[inline]
    fn drop(&mut self) {
        #[cfg(all(debug_assertions, feature = "std"))]
        if self.active {
            let _ = CONTEXT.try_with(|c| c.borrow_mut().non_block.pop());
        }
    }
}

/// Marks "this thread is in the invalidate path of address space `key`";
/// entering it again from a callback reports [`Warning::Recursion`].
pub(crate) struct InvalidateSection {
    #[cfg(all(debug_assertions, feature = "std"))]
    key: u64,
}

impl InvalidateSection {
    #[inline]
    #[cfg_attr(not(all(debug_assertions, feature = "std")), allow(unused_variables))]
    pub(crate) fn enter(key: u64, diag: &Diagnostics) -> InvalidateSection {
        #[cfg(all(debug_assertions, feature = "std"))]
        {
            let recursed = CONTEXT.with(|c| {
                let mut c = c.borrow_mut();
                let r = c.invalidating.contains(&key);
                c.invalidating.push(key);
                r
            });
            if recursed {
                diag.report(
                    Warning::Recursion,
                    "recursion into the invalidate path of the same address space from a callback",
                );
            }
            InvalidateSection { key }
        }
        #[cfg(not(all(debug_assertions, feature = "std")))]
        InvalidateSection {}
    }
}

impl Drop for InvalidateSection {
    #[inline]
    fn drop(&mut self) {
        #[cfg(all(debug_assertions, feature = "std"))]
        {
            let key = self.key;
            let _ = CONTEXT.try_with(|c| {
                let mut c = c.borrow_mut();
                if let Some(pos) = c.invalidating.iter().rposition(|k| *k == key) {
                    c.invalidating.remove(pos);
                }
            });
        }
    }
}
