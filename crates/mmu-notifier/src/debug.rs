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
//! builds (`debug_assertions`); in release builds [`might_sleep`] and the
//! section markers compile to nothing (the counted warnings stay). They keep
//! a per-task [`DebugContext`]: a thread-local with `std`; without std the
//! embedder's [`ContextSource`] says which context the caller owns, and the
//! checks run once one is installed ([`set_context_source`]).

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

/// The per-task state of the sleep and recursion checks: which address
/// spaces' non-blockable callbacks and invalidate paths the task is inside.
///
/// With `std` every thread has one of its own. Without std the embedder keeps
/// one per task (or per CPU where sections are not preempted), the way it
/// keeps SRCU readers, and says which one the caller owns through a
/// [`ContextSource`] installed with [`set_context_source`].
#[derive(Debug, Default)]
pub struct DebugContext {
    // Read only by the checks, which exist in debug builds only.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    state: spin::Mutex<Context>,
}

#[derive(Debug, Default)]
#[cfg_attr(not(debug_assertions), allow(dead_code))]
struct Context {
    /// Diagnostics of the address spaces whose non-blockable callbacks are
    /// running in this context, innermost last.
    non_block: alloc::vec::Vec<DiagHandle>,
    /// Address spaces whose invalidate path this context is inside.
    invalidating: alloc::vec::Vec<u64>,
}

impl DebugContext {
    /// An empty context (usable in a `static`).
    pub const fn new() -> DebugContext {
        DebugContext {
            state: spin::Mutex::new(Context {
                non_block: alloc::vec::Vec::new(),
                invalidating: alloc::vec::Vec::new(),
            }),
        }
    }
}

/// Where the debug checks find the calling task's [`DebugContext`] (Linux
/// keeps it in `task_struct`). An embedder without std implements it over
/// its per-task or per-CPU data.
pub trait ContextSource: Sync {
    /// The context of the calling task, or `None` where the caller has none
    /// (an early boot path, an interrupt): the checks are then skipped.
    fn current(&self) -> Option<&DebugContext>;
}

/// The context source installed by [`set_context_source`].
static SOURCE: spin::Once<&'static dyn ContextSource> = spin::Once::new();

/// Installs where the sleep and recursion checks find the caller's context.
/// Without std the checks run only once a source is installed; with std the
/// source, once installed, replaces the per-thread contexts. The checks exist
/// only in debug builds (`debug_assertions`); the counted warnings are
/// reported in every build.
///
/// # Errors
/// [`Error::ContextSourceSet`](crate::Error::ContextSourceSet) when a source
/// was already installed (it stays in place).
pub fn set_context_source(source: &'static dyn ContextSource) -> Result<(), crate::Error> {
    let mut installed = false;
    SOURCE.call_once(|| {
        installed = true;
        source
    });
    if installed {
        Ok(())
    } else {
        Err(crate::Error::ContextSourceSet)
    }
}

#[cfg(all(debug_assertions, feature = "std"))]
crate::primitive::thread_local! {
    static CONTEXT: DebugContext = DebugContext::new();
}

/// Runs `f` on the caller's debug context, if it has one and it is not in
/// use further up the same call chain.
#[cfg(debug_assertions)]
fn with_context<T>(f: impl FnOnce(&mut Context) -> T) -> Option<T> {
    fn run<T>(ctx: &DebugContext, f: impl FnOnce(&mut Context) -> T) -> Option<T> {
        // Only the owning task uses a context, so the lock is free unless a
        // tracing subscriber re-entered the checks: skip them then.
        ctx.state.try_lock().map(|mut c| f(&mut c))
    }
    if let Some(source) = SOURCE.get() {
        return source.current().and_then(|ctx| run(ctx, f));
    }
    #[cfg(feature = "std")]
    {
        CONTEXT.try_with(|ctx| run(ctx, f)).ok().flatten()
    }
    #[cfg(not(feature = "std"))]
    {
        None
    }
}

/// Declares that the caller may sleep here (Linux `might_sleep`). Inside a
/// non-blockable invalidation callback this reports
/// [`Warning::SleepInNonBlockable`] on that address space (debug builds only;
/// free in release builds; without std only once a [`ContextSource`] is
/// installed). Call it in your own blocking paths that callbacks may reach.
#[inline]
pub fn might_sleep() {
    #[cfg(debug_assertions)]
    {
        let diag = with_context(|c| c.non_block.last().cloned()).flatten();
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
    #[cfg(debug_assertions)]
    active: bool,
}

impl NonBlockSection {
    #[inline]
    #[cfg_attr(not(debug_assertions), allow(unused_variables))]
    pub(crate) fn enter(diag: &DiagHandle, active: bool) -> NonBlockSection {
        #[cfg(debug_assertions)]
        {
            // Only a section that was recorded pops on drop.
            let active = active && with_context(|c| c.non_block.push(diag.clone())).is_some();
            NonBlockSection { active }
        }
        #[cfg(not(debug_assertions))]
        NonBlockSection {}
    }
}

impl Drop for NonBlockSection {
    #[inline]
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        if self.active {
            let _ = with_context(|c| c.non_block.pop());
        }
    }
}

/// Marks "this thread is in the invalidate path of address space `key`";
/// entering it again from a callback reports [`Warning::Recursion`].
pub(crate) struct InvalidateSection {
    /// The address space recorded, `None` where no context was available.
    #[cfg(debug_assertions)]
    key: Option<u64>,
}

impl InvalidateSection {
    #[inline]
    #[cfg_attr(not(debug_assertions), allow(unused_variables))]
    pub(crate) fn enter(key: u64, diag: &Diagnostics) -> InvalidateSection {
        #[cfg(debug_assertions)]
        {
            let recursed = with_context(|c| {
                let r = c.invalidating.contains(&key);
                c.invalidating.push(key);
                r
            });
            if recursed == Some(true) {
                diag.report(
                    Warning::Recursion,
                    "recursion into the invalidate path of the same address space from a callback",
                );
            }
            InvalidateSection {
                key: recursed.map(|_| key),
            }
        }
        #[cfg(not(debug_assertions))]
        InvalidateSection {}
    }
}

impl Drop for InvalidateSection {
    #[inline]
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        if let Some(key) = self.key {
            let _ = with_context(|c| {
                if let Some(pos) = c.invalidating.iter().rposition(|k| *k == key) {
                    c.invalidating.remove(pos);
                }
            });
        }
    }
}
