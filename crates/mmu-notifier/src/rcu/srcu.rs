//! Sleepable read-copy-update (SRCU) grace-period domains.
//!
//! Notifier callbacks run inside a read-side section of the address space's
//! [`Domain`] and may block. [`Domain::synchronize`] waits for every
//! read-side section of the domain that started before it, on any thread.
//! [`Domain::call`] queues a deferred function (Linux's `call_srcu`) that runs
//! after a later grace period, and [`Domain::barrier`] waits until every
//! function queued before it has run.
//!
//! A domain is a value. The std build has one process-wide domain,
//! `Domain::global()`, which every `Subscriptions::new()` uses (as Linux uses
//! one `srcu_struct` for all address spaces), and the free functions of this
//! module (`read_lock`, `synchronize`, `call`, `barrier`) act on it. An embedder without std creates its own with
//! [`Domain::with_backend`] and passes it to
//! [`Subscriptions::with_domain`](crate::Subscriptions::with_domain).
//!
//! # Readers
//!
//! Each execution context that reads owns a [`Reader`] of the domain: a
//! counter whose low bits are its nesting depth and whose top bit is the
//! grace-period phase its outermost section started in. In the std build the
//! reader of a thread is found through a thread-local and registered on the
//! thread's first read (and recycled when the thread exits). Without
//! thread-locals the embedder registers readers by hand
//! ([`Domain::register_reader`]: one per task, or per CPU where sections are
//! not preempted) and its [`Backend`] says which one the calling context
//! owns.
//!
//! # Algorithm
//!
//! The liburcu "memb" scheme:
//!
//! * The outermost `read_lock` copies the global counter (phase plus a
//!   nesting unit) into the reader and runs the reader's light fence; nested
//!   ones just increment. The end of a section decrements with a release
//!   store. No read-modify-write and no hardware fence on the read side.
//! * A grace period takes the writer's heavy fence, flips the phase and waits
//!   until no reader is inside a section of the old phase, flips again and
//!   waits again, then takes the heavy fence. Two flips are needed because a
//!   reader may read the phase just before a flip and publish it just after
//!   the wait scanned it.
//!
//! The fence pair is `membarrier(2)` against a compiler fence in the std
//! build on Linux (see the crate-private `barrier` module), `fence(SeqCst)`
//! on both sides elsewhere, and the backend's in an embedding.
//!
//! This crate starts no threads. Deferred functions run at the end of the next
//! grace period anyone completes (every `unregister`, every address-space exit
//! and every [`Domain::synchronize`] / [`Domain::barrier`] call drains the
//! ones that are due), so, exactly as with Linux modules, code that relies on
//! them having run must call [`Domain::barrier`] (in the std build
//! `mmu_notifier::synchronize` does it for the global domain).
//!
//! ```
//! use mmu_notifier::srcu;
//! let guard = srcu::read_lock();
//! assert!(srcu::in_read_section());
//! drop(guard);
//! srcu::synchronize().unwrap();
//! ```

use alloc::boxed::Box;
use alloc::collections::{BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool as PlainBool, AtomicU64 as PlainU64};

#[cfg(feature = "std")]
use crate::barrier::Flavour;
use crate::sync::{self, fence, AtomicUsize, Mutex, Ordering};
use crate::Error;

/// Phase bit of a reader counter (the top bit).
const PHASE: usize = 1 << (usize::BITS - 1);
/// Nesting-depth bits of a reader counter (below the phase bit and the
/// registration bit of the std build's thread-local counters).
const NEST_MASK: usize = (1 << (usize::BITS - 2)) - 1;

/// A deferred function queued by [`Domain::call`].
type DeferredFn = Box<dyn FnOnce() + Send + 'static>;

struct DeferredQueue {
    next_ticket: u64,
    queue: VecDeque<(u64, DeferredFn)>,
    /// Tickets queued or running, so [`Domain::barrier`] can wait for exactly
    /// the ones queued before it.
    unfinished: BTreeSet<u64>,
}

/// Where readers come from, how the fences are taken and how waits wait.
#[derive(Clone, Copy)]
enum Source {
    /// std: thread-local readers, the detected fence pair, sleeping waits.
    #[cfg(feature = "std")]
    Threads(Flavour),
    /// An embedder's backend.
    Backend(&'static dyn Backend),
}

impl Source {
    #[inline(always)]
    fn light(self) {
        match self {
            #[cfg(feature = "std")]
            Source::Threads(f) => f.light(),
            Source::Backend(b) => b.light_barrier(),
        }
    }

    fn heavy(self) {
        match self {
            #[cfg(feature = "std")]
            Source::Threads(f) => f.heavy(),
            Source::Backend(b) => b.heavy_barrier(),
        }
    }
}

/// One wait step of a loop waiting for another context.
pub(crate) struct Waiter {
    source: Source,
    #[cfg(feature = "std")]
    backoff: sync::Backoff,
}

impl Waiter {
    fn new(source: Source) -> Waiter {
        Waiter {
            source,
            #[cfg(feature = "std")]
            backoff: sync::Backoff::new(),
        }
    }

    pub(crate) fn snooze(&mut self) {
        match self.source {
            #[cfg(feature = "std")]
            Source::Threads(_) => self.backoff.snooze(),
            Source::Backend(b) => b.relax(),
        }
    }
}

/// An SRCU domain: the grace periods that protect the notifier lists and
/// callbacks of the address spaces that use it.
///
/// ```
/// use mmu_notifier::srcu::Domain;
/// // The std build's own domain; embedders create theirs with `with_backend`.
/// let d = Domain::global();
/// let section = d.read_lock();
/// assert!(d.in_read_section());
/// drop(section);
/// d.synchronize().unwrap();
/// ```
#[repr(C)] // the fields every read-side section reads come first, together
pub struct Domain {
    /// Global counter: `PHASE` bit plus one nesting unit, copied by readers.
    gp: AtomicUsize,
    /// The std build's global domain reads through counters in thread-locals
    /// (the `tls` module below) rather than heap readers: [`TLS_OFF`]
    /// (heap readers), [`TLS_LIGHT`] (and the read side's fence is a
    /// compiler barrier, `membarrier(2)` doing the rest) or [`TLS_FENCE`] (a
    /// real fence). One byte, so the fast path decides both with one load.
    #[cfg_attr(not(all(feature = "std", not(any(loom, shuttle)))), allow(dead_code))]
    tls: u8,
    source: Source,
    /// Every reader registered. Grace periods scan it under its lock.
    registry: Mutex<Registry>,
    /// Serialises grace periods.
    gp_lock: Mutex<()>,
    deferred: Mutex<DeferredQueue>,
    #[cfg(feature = "std")]
    deferred_done: sync::Condvar,
}

impl core::fmt::Debug for Domain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("srcu::Domain")
            .field("readers", &sync::lock(&self.registry).len())
            .field("pending", &self.pending())
            .finish()
    }
}

/// The readers of a domain.
struct Registry {
    /// Heap readers. They are leaked (`&'static`) so the read side reaches
    /// its own through a plain pointer, and recycled when their owner gives
    /// them back; their number is bounded by the largest number of contexts
    /// that read at once.
    heap: Vec<&'static Reader>,
    /// The thread-local counters of the global domain's threads.
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    tls: Vec<tls::TlsCounter>,
}

impl Registry {
    fn len(&self) -> usize {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        return self.heap.len() + self.tls.len();
        #[cfg(not(all(feature = "std", not(any(loom, shuttle)))))]
        return self.heap.len();
    }
}

/// One execution context's reader of a [`Domain`]: its section counter and
/// the per-context state the subsystem keeps with it.
pub struct Reader {
    ctr: AtomicUsize,
    /// The domain, so the read side needs no second lookup.
    domain: &'static Domain,
    /// Copied from the domain: the read side's fence without a second load.
    source: Source,
    /// Running a deferred function of the domain (waiting would deadlock).
    in_deferred: PlainBool,
    /// Key of the address space whose interval callbacks this context is
    /// running (0: none).
    walking: PlainU64,
    /// Not owned by any context; `register_reader` may hand it out again.
    free: PlainBool,
}

impl core::fmt::Debug for Reader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("srcu::Reader")
            .field("nesting", &(self.ctr.load(Ordering::Relaxed) & NEST_MASK))
            .finish()
    }
}

#[cfg(all(feature = "std", not(any(loom, shuttle))))]
static GLOBAL: std::sync::LazyLock<Domain> = std::sync::LazyLock::new(Domain::new_global);

// Under the model checkers the global domain is created afresh for every
// execution.
#[cfg(loom)]
loom::lazy_static! {
    static ref GLOBAL: Domain = Domain::new_global();
}
#[cfg(shuttle)]
shuttle::lazy_static! {
    static ref GLOBAL: Domain = Domain::new_global();
}

/// The thread-local readers of the std build: each thread finds its reader of
/// a domain with one thread-local load and a compare (the last domain it read
/// from), else in the list of its readers.
#[cfg(feature = "std")]
mod thread_readers {
    use super::{Domain, Reader, NEST_MASK};
    use crate::sync::Ordering;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};

    /// This thread's readers; gives them back to their domains when the
    /// thread exits.
    pub(super) struct Owned(RefCell<Vec<&'static Reader>>);

    // Constant initialisers: the fast path is a bare thread-pointer-relative
    // load, with no lazy-init or destructor-state check.
    #[cfg(not(loom))]
    crate::sync::thread_local! {
        static LAST: Cell<Option<&'static Reader>> = const { Cell::new(None) };
        static OWNED: Owned = const { Owned(RefCell::new(Vec::new())) };
    }

    #[cfg(loom)]
    loom::thread_local! {
        static LAST: Cell<Option<&'static Reader>> = Cell::new(None);
        static OWNED: Owned = Owned(RefCell::new(Vec::new()));
    }

    #[cfg(not(loom))]
    crate::sync::thread_local! {
        /// Key of the address space whose interval callbacks this thread runs.
        static WALKING: Cell<u64> = const { Cell::new(0) };
        /// Address of the domain whose deferred function this thread runs.
        static IN_DEFERRED: Cell<usize> = const { Cell::new(0) };
    }

    #[cfg(loom)]
    loom::thread_local! {
        static WALKING: Cell<u64> = Cell::new(0);
        static IN_DEFERRED: Cell<usize> = Cell::new(0);
    }

    pub(super) fn set_walking(key: u64) -> u64 {
        WALKING.with(|w| w.replace(key))
    }

    pub(super) fn walking() -> u64 {
        WALKING.try_with(Cell::get).unwrap_or(0)
    }

    fn addr(domain: &'static Domain) -> usize {
        domain as *const Domain as usize
    }

    pub(super) fn set_in_deferred(domain: &'static Domain, on: bool) -> bool {
        let new = if on { addr(domain) } else { 0 };
        IN_DEFERRED.with(|d| d.replace(new)) == addr(domain)
    }

    pub(super) fn in_deferred(domain: &'static Domain) -> bool {
        IN_DEFERRED.try_with(Cell::get).unwrap_or(0) == addr(domain)
    }

    impl Drop for Owned {
        fn drop(&mut self) {
            // A destructor that runs later on this thread and reads gets a
            // fresh reader instead of one given back here.
            let _ = LAST.try_with(|l| l.set(None));
            for r in self.0.get_mut().drain(..) {
                // A reader whose thread leaked a guard (mem::forget) stays
                // nested; never recycle it.
                if r.ctr.load(Ordering::Relaxed) & NEST_MASK == 0 {
                    r.give_back();
                }
            }
        }
    }

    /// This thread's reader of `domain` if it is the last domain the thread
    /// read from.
    #[inline(always)]
    pub(super) fn last(domain: &'static Domain) -> Option<&'static Reader> {
        match LAST.with(Cell::get) {
            Some(r) if core::ptr::eq(r.domain, domain) => Some(r),
            _ => None,
        }
    }

    /// This thread's reader of `domain`: another domain than last time, or
    /// this thread's first read.
    #[cold]
    #[inline(never)]
    pub(super) fn local_slow(domain: &'static Domain) -> &'static Reader {
        let known = OWNED
            .try_with(|o| {
                o.0.borrow()
                    .iter()
                    .copied()
                    .find(|r| core::ptr::eq(r.domain, domain))
            })
            .ok()
            .flatten();
        let r = known.unwrap_or_else(|| {
            let r = domain.register_reader();
            // If this thread is already exiting the reader cannot be given
            // back later and is simply never recycled.
            let _ = OWNED.try_with(|o| o.0.borrow_mut().push(r));
            r
        });
        LAST.with(|l| l.set(Some(r)));
        r
    }
}

/// Whether a reader counter is inside a section that began before the global
/// phase became `phase`: an idle reader, or one whose outermost section
/// copied `phase`, is not.
#[inline]
fn in_old_section(c: usize, phase: usize) -> bool {
    c & NEST_MASK != 0 && c & PHASE != phase
}

/// [`Domain`]`::tls`: heap readers.
const TLS_OFF: u8 = 0;
/// [`Domain`]`::tls`: thread-local counters, compiler-barrier read side.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
const TLS_LIGHT: u8 = 1;
/// [`Domain`]`::tls`: thread-local counters, real fence on the read side.
#[cfg_attr(not(all(feature = "std", not(any(loom, shuttle)))), allow(dead_code))]
const TLS_FENCE: u8 = 2;

/// Threshold of [`Domain::try_reclaim`]: deferred functions waiting before a
/// registration attempts a grace period itself.
const RECLAIM_BACKLOG: usize = 64;

impl Domain {
    #[cfg_attr(not(feature = "std"), allow(unused_variables))]
    fn with_source(source: Source, tls_fast: bool) -> Domain {
        let tls = match source {
            #[cfg(feature = "std")]
            Source::Threads(Flavour::Membarrier) if tls_fast => TLS_LIGHT,
            #[cfg(feature = "std")]
            Source::Threads(_) if tls_fast => TLS_FENCE,
            _ => TLS_OFF,
        };
        Domain {
            gp: AtomicUsize::new(1),
            tls,
            registry: Mutex::new(Registry {
                heap: Vec::new(),
                #[cfg(all(feature = "std", not(any(loom, shuttle))))]
                tls: Vec::new(),
            }),
            gp_lock: Mutex::new(()),
            source,
            deferred: Mutex::new(DeferredQueue {
                next_ticket: 0,
                queue: VecDeque::new(),
                unfinished: BTreeSet::new(),
            }),
            #[cfg(feature = "std")]
            deferred_done: sync::Condvar::new(),
        }
    }

    /// A new domain with thread-local readers and the std build's fences and
    /// waits. Most programs use [`Domain::global`]; a separate domain keeps
    /// its grace periods independent of other address spaces' readers.
    /// Domains live for the rest of the program (leak it, or keep it in a
    /// `static`), as readers point to them.
    #[cfg(feature = "std")]
    pub fn new() -> Domain {
        Domain::with_source(Source::Threads(Flavour::detect()), false)
    }

    /// The global domain: threads read through thread-local counters.
    #[cfg(feature = "std")]
    fn new_global() -> Domain {
        Domain::with_source(Source::Threads(Flavour::detect()), true)
    }

    /// The process-wide domain of the std build, used by
    /// [`Subscriptions::new`](crate::Subscriptions::new) and this module's
    /// free functions.
    #[cfg(feature = "std")]
    pub fn global() -> &'static Domain {
        &GLOBAL
    }

    /// A domain whose readers, fences and waits come from `backend` (an
    /// embedding without std; see [`Backend`]).
    pub fn with_backend(backend: &'static dyn Backend) -> Domain {
        Domain::with_source(Source::Backend(backend), false)
    }

    /// Registers a new reader (or hands out one given back earlier). An
    /// embedder keeps it with the context (task or CPU) that will read, and
    /// returns it from [`Backend::reader`]. The std build registers its
    /// thread-local readers itself.
    pub fn register_reader(&'static self) -> &'static Reader {
        let mut registry = sync::lock(&self.registry);
        // Under loom a reader given back in one execution must not be seen
        // in another: no recycling there.
        #[cfg(loom)]
        let reused: Option<&'static Reader> = None;
        #[cfg(not(loom))]
        let reused = registry.heap.iter().copied().find(|r| {
            r.free
                .compare_exchange(
                    true,
                    false,
                    core::sync::atomic::Ordering::Acquire,
                    core::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        });
        reused.unwrap_or_else(|| {
            let r: &'static Reader = Box::leak(Box::new(Reader {
                ctr: AtomicUsize::new(0),
                domain: self,
                source: self.source,
                in_deferred: PlainBool::new(false),
                walking: PlainU64::new(0),
                free: PlainBool::new(false),
            }));
            registry.heap.push(r);
            r
        })
    }

    /// Removes the calling thread's thread-local counter from the registry
    /// (its thread is exiting).
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    pub(crate) fn unregister_tls(&self) {
        sync::lock(&self.registry).tls.retain(|t| !t.is_mine());
    }

    /// Gives `reader` back for [`register_reader`](Self::register_reader) to
    /// hand out again (a task exited).
    ///
    /// # Errors
    /// [`Error::ReaderBusy`] if it is inside a section, or belongs to another
    /// domain; nothing changes then.
    pub fn unregister_reader(&'static self, reader: &'static Reader) -> Result<(), Error> {
        if !core::ptr::eq(reader.domain, self)
            || reader.ctr.load(Ordering::Relaxed) & NEST_MASK != 0
        {
            return Err(Error::ReaderBusy);
        }
        reader.give_back();
        Ok(())
    }

    /// The calling context's reader.
    #[inline(always)]
    fn local_reader(&'static self) -> &'static Reader {
        // The std fast path first: only thread-local domains put readers in
        // the thread-local, so a hit needs no look at `source` (one
        // dependent load fewer on every hook).
        #[cfg(feature = "std")]
        if let Some(r) = thread_readers::last(self) {
            return r;
        }
        self.local_reader_slow()
    }

    #[inline(never)]
    fn local_reader_slow(&'static self) -> &'static Reader {
        match self.source {
            #[cfg(feature = "std")]
            Source::Threads(_) => thread_readers::local_slow(self),
            Source::Backend(b) => {
                let r = b.reader(self);
                // The contract of `Backend::reader`, checked where it is cheap
                // and a breach would be unsound.
                assert!(
                    core::ptr::eq(r.domain, self),
                    "srcu::Backend::reader returned a reader of another domain"
                );
                r
            }
        }
    }

    /// Enters a read-side section (Linux `srcu_read_lock`). Sections nest.
    ///
    /// In the std build's global domain this costs a load and a store of a
    /// thread-local counter plus a load of the global counter, like
    /// liburcu's: no read-modify-write and no hardware fence (see the module
    /// documentation).
    #[inline]
    pub fn read_lock(&'static self) -> ReadGuard {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        if self.tls != TLS_OFF {
            let flavour = self.tls_flavour();
            if tls::enter(&self.gp, NEST_MASK, || flavour.light()) {
                return ReadGuard {
                    reader: None,
                    _not_send: PhantomData,
                };
            }
            return self.read_lock_tls_slow();
        }
        self.read_lock_heap()
    }

    /// The fence pair of the thread-local fast path, from the one byte it
    /// reads (not from `source`, a second load).
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    #[inline(always)]
    fn tls_flavour(&self) -> Flavour {
        if self.tls == TLS_FENCE {
            Flavour::Fence
        } else {
            Flavour::Membarrier
        }
    }

    /// A section on the calling context's heap reader.
    #[inline(always)]
    fn read_lock_heap(&'static self) -> ReadGuard {
        let reader = self.local_reader();
        reader.enter();
        ReadGuard {
            reader: Some(reader),
            _not_send: PhantomData,
        }
    }

    /// The global domain on a thread whose counter is not registered: this
    /// thread's first read (register it), or a read from a thread-local
    /// destructor after the counter left the registry (use a heap reader).
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    #[cold]
    #[inline(never)]
    fn read_lock_tls_slow(&'static self) -> ReadGuard {
        let registered = tls::register(self, |c| sync::lock(&self.registry).tls.push(c));
        let flavour = self.tls_flavour();
        if registered && tls::enter(&self.gp, NEST_MASK, || flavour.light()) {
            return ReadGuard {
                reader: None,
                _not_send: PhantomData,
            };
        }
        self.read_lock_heap()
    }

    /// Whether the calling context is inside a read-side section of this
    /// domain (for example, in a notifier callback). Waiting for a grace
    /// period there would deadlock.
    pub fn in_read_section(&'static self) -> bool {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        if self.tls != TLS_OFF {
            let c = tls::current();
            if c & tls::REGISTERED != 0 {
                return c & NEST_MASK != 0;
            }
        }
        self.local_reader().ctr.load(Ordering::Relaxed) & NEST_MASK != 0
    }

    /// A wait step for loops that wait for another context.
    pub(crate) fn waiter(&self) -> Waiter {
        Waiter::new(self.source)
    }

    /// Whether waits may sleep on a condition variable (the std build's
    /// thread-local domains) rather than loop over [`Backend::relax`].
    #[cfg(feature = "std")]
    pub(crate) fn sleeps(&self) -> bool {
        matches!(self.source, Source::Threads(_))
    }

    /// Records that the calling context runs the interval callbacks of the
    /// address space `key` (0: none); returns the previous key.
    pub(crate) fn set_walking(&'static self, key: u64) -> u64 {
        match self.source {
            #[cfg(feature = "std")]
            Source::Threads(_) => thread_readers::set_walking(key),
            Source::Backend(_) => self
                .local_reader()
                .walking
                .swap(key, core::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The address space whose interval callbacks the calling context runs.
    pub(crate) fn walking(&'static self) -> u64 {
        match self.source {
            #[cfg(feature = "std")]
            Source::Threads(_) => thread_readers::walking(),
            Source::Backend(_) => self
                .local_reader()
                .walking
                .load(core::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Marks the calling context as running a deferred function of this
    /// domain (or not); returns the previous mark.
    fn set_in_deferred(&'static self, on: bool) -> bool {
        match self.source {
            #[cfg(feature = "std")]
            Source::Threads(_) => thread_readers::set_in_deferred(self, on),
            Source::Backend(_) => self
                .local_reader()
                .in_deferred
                .swap(on, core::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Whether the calling context runs a deferred function of this domain.
    fn in_deferred(&'static self) -> bool {
        match self.source {
            #[cfg(feature = "std")]
            Source::Threads(_) => thread_readers::in_deferred(self),
            Source::Backend(_) => self
                .local_reader()
                .in_deferred
                .load(core::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Whether every reader is outside the sections that began before the
    /// global phase became `phase`. Reads the registry under its lock: a
    /// reader registered meanwhile copied the new phase, and a thread-local
    /// counter is only valid while its registry entry is.
    fn readers_clear(&self, phase: usize) -> bool {
        let registry = sync::lock(&self.registry);
        if registry
            .heap
            .iter()
            .any(|r| in_old_section(r.ctr.load(Ordering::Acquire), phase))
        {
            return false;
        }
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        if registry
            .tls
            .iter()
            .any(|t| in_old_section(t.load(&registry), phase))
        {
            return false;
        }
        true
    }

    /// Waits until [`readers_clear`](Self::readers_clear) for `phase`.
    fn wait_for_readers(&self, phase: usize, waiter: &mut Waiter) {
        while !self.readers_clear(phase) {
            waiter.snooze();
        }
    }

    /// Waits for every read-side section that started before this call.
    fn grace_period(&self) {
        let _serial = sync::lock(&self.gp_lock);
        self.flip_twice(Some(&mut Waiter::new(self.source)));
    }

    /// A grace period only if it needs no waiting: returns false (having
    /// changed nothing that matters) as soon as a reader is inside a section
    /// of the old phase or another grace period is running.
    fn try_grace_period(&self) -> bool {
        let Some(_serial) = sync::try_lock(&self.gp_lock) else {
            return false;
        };
        self.flip_twice(None)
    }

    /// The grace period proper, with `gp_lock` held: heavy fence, two flips
    /// each followed by a wait for the readers of the old phase, heavy
    /// fence. Without a `waiter` it only looks, and returns false at the
    /// first reader it would wait for (giving up after a flip is harmless:
    /// every grace period flips twice and waits after each flip, whatever
    /// phase it starts in).
    fn flip_twice(&self, mut waiter: Option<&mut Waiter>) -> bool {
        self.source.heavy();
        for _ in 0..2 {
            let phase = self.flip();
            fence(Ordering::SeqCst);
            match waiter.as_deref_mut() {
                Some(w) => self.wait_for_readers(phase, w),
                None if !self.readers_clear(phase) => return false,
                None => {}
            }
        }
        self.source.heavy();
        true
    }

    /// Flips the global phase (keeping one nesting unit in the counter, which
    /// readers copy) and returns the new phase.
    fn flip(&self) -> usize {
        let phase = (self.gp.load(Ordering::Relaxed) ^ PHASE) & PHASE;
        self.gp.store(phase | 1, Ordering::Relaxed);
        phase
    }

    /// Queues `f` to run after a grace period (Linux `call_srcu`). Never
    /// blocks.
    pub fn call(&self, f: impl FnOnce() + Send + 'static) {
        let mut q = sync::lock(&self.deferred);
        let t = q.next_ticket;
        q.next_ticket += 1;
        q.queue.push_back((t, Box::new(f)));
        q.unfinished.insert(t);
    }

    fn next_ticket(&self) -> u64 {
        sync::lock(&self.deferred).next_ticket
    }

    /// Runs every queued function whose ticket is below `below`, i.e. that was
    /// queued before a grace period that has now completed.
    fn run_due(&'static self, below: u64) {
        loop {
            let item = {
                let mut q = sync::lock(&self.deferred);
                match q.queue.front() {
                    Some((t, _)) if *t < below => q.queue.pop_front(),
                    _ => None,
                }
            };
            let Some((ticket, f)) = item else { break };
            let was = self.set_in_deferred(true);
            run_contained(f);
            self.set_in_deferred(was);
            let mut q = sync::lock(&self.deferred);
            q.unfinished.remove(&ticket);
            drop(q);
            #[cfg(feature = "std")]
            self.deferred_done.notify_all();
        }
    }

    fn check_may_wait(&'static self, what: &'static str) -> Result<(), Error> {
        if self.check_quiet().is_err() {
            tracing::warn!("mmu_notifier: {what} from inside an SRCU read-side section or deferred callback refused (would deadlock)");
            return Err(Error::WouldDeadlock(what));
        }
        crate::debug::might_sleep();
        Ok(())
    }

    /// Waits for a grace period (Linux `synchronize_srcu`): every read-side
    /// section of this domain that started before this call has ended when it
    /// returns. Deferred functions that are due then run on this context.
    ///
    /// # Errors
    /// [`Error::WouldDeadlock`] when called inside a read-side section or from
    /// a deferred function.
    pub fn synchronize(&'static self) -> Result<(), Error> {
        self.check_may_wait("srcu::synchronize")?;
        self.synchronize_unchecked();
        Ok(())
    }

    /// The grace period plus the deferred drain, for callers that checked.
    /// Returns the ticket bound of the functions it made due (every function
    /// queued before the call).
    pub(crate) fn synchronize_unchecked(&'static self) -> u64 {
        let below = self.next_ticket();
        self.grace_period();
        self.run_due(below);
        below
    }

    /// Bounds the memory retired lists hold when nothing else completes grace
    /// periods: with a backlog of deferred functions, and outside any
    /// section, attempts a grace period that does not wait and runs what it
    /// made due. For registration paths, which may run deferred functions.
    pub(crate) fn try_reclaim(&'static self) {
        if self.pending() < RECLAIM_BACKLOG || self.check_quiet().is_err() {
            return;
        }
        let below = self.next_ticket();
        if self.try_grace_period() {
            self.run_due(below);
        }
    }

    /// Ok when the calling context is neither in a section nor in a deferred
    /// function (no report, unlike `check_may_wait`).
    fn check_quiet(&'static self) -> Result<(), ()> {
        if self.in_read_section() || self.in_deferred() {
            Err(())
        } else {
            Ok(())
        }
    }

    /// Waits until every function queued with [`call`](Self::call) before
    /// this call has run (Linux `srcu_barrier`, which is what
    /// `mmu_notifier_synchronize` documents).
    ///
    /// # Errors
    /// [`Error::WouldDeadlock`] when called inside a read-side section or from
    /// a deferred function.
    pub fn barrier(&'static self) -> Result<(), Error> {
        self.check_may_wait("srcu::barrier")?;
        let below = self.synchronize_unchecked();
        // Another context may have taken some of our functions and still be
        // running them: wait for those too.
        let mut waiter = Waiter::new(self.source);
        let mut q = sync::lock(&self.deferred);
        while q.unfinished.range(..below).next().is_some() {
            match self.source {
                #[cfg(feature = "std")]
                Source::Threads(_) => q = sync::wait(&self.deferred_done, q),
                Source::Backend(_) => {
                    drop(q);
                    waiter.snooze();
                    q = sync::lock(&self.deferred);
                }
            }
        }
        Ok(())
    }

    /// Number of deferred functions queued or running.
    pub fn pending(&self) -> usize {
        sync::lock(&self.deferred).unfinished.len()
    }
}

#[cfg(feature = "std")]
impl Default for Domain {
    fn default() -> Self {
        Domain::new()
    }
}

/// Runs a deferred function; where panics unwind, a panic is caught and
/// reported instead of unwinding through the grace-period machinery.
fn run_contained(f: DeferredFn) {
    #[cfg(all(feature = "std", panic = "unwind"))]
    {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            tracing::error!("mmu_notifier: a deferred SRCU callback panicked");
        }
    }
    #[cfg(not(all(feature = "std", panic = "unwind")))]
    f();
}

impl Reader {
    /// The read side of `read_lock`: the outermost section copies the global
    /// counter (its phase plus one nesting unit) and runs the light fence;
    /// nested ones add a unit.
    #[inline(always)]
    fn enter(&self) {
        let c = self.ctr.load(Ordering::Relaxed);
        if c & NEST_MASK == 0 {
            self.ctr
                .store(self.domain.gp.load(Ordering::Relaxed), Ordering::Relaxed);
            self.source.light();
        } else {
            self.ctr.store(c + 1, Ordering::Relaxed);
        }
    }

    /// The end of a section: removes a unit. (The phase bit may stay when
    /// the depth drops to 0: an idle reader is recognised by its depth.)
    #[inline(always)]
    fn exit(&self) {
        let c = self.ctr.load(Ordering::Relaxed);
        // Release: everything the section did happens-before a grace period
        // that observes the section ended.
        self.ctr.store(c - 1, Ordering::Release);
    }

    fn give_back(&self) {
        self.free.store(true, core::sync::atomic::Ordering::Release);
    }
}

/// Proof that this context is inside an SRCU read-side section; the section
/// ends when it is dropped. Not `Send`: a section belongs to one context.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct ReadGuard {
    /// `None`: the std build's thread-local counter of the global domain.
    /// (One word, so a guard and a pointer come back from a call in
    /// registers.)
    reader: Option<&'static Reader>,
    _not_send: PhantomData<*const ()>,
}

impl core::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("srcu::ReadGuard")
    }
}

impl ReadGuard {
    /// The domain this section belongs to.
    #[inline(always)]
    pub fn domain(&self) -> &'static Domain {
        match self.reader {
            Some(r) => r.domain,
            #[cfg(feature = "std")]
            None => Domain::global(),
            #[cfg(not(feature = "std"))]
            None => unreachable!("heap readers only"),
        }
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        match self.reader {
            Some(r) => r.exit(),
            #[cfg(all(feature = "std", not(any(loom, shuttle))))]
            None => tls::exit(NEST_MASK),
            #[cfg(not(all(feature = "std", not(any(loom, shuttle)))))]
            None => unreachable!("heap readers only"),
        }
    }
}

/// Enters a read-side section of [`Domain::global`].
#[cfg(feature = "std")]
#[inline]
pub fn read_lock() -> ReadGuard {
    Domain::global().read_lock()
}

/// Whether the calling thread is inside a read-side section of
/// [`Domain::global`].
#[cfg(feature = "std")]
pub fn in_read_section() -> bool {
    Domain::global().in_read_section()
}

/// [`Domain::synchronize`] on [`Domain::global`].
///
/// # Errors
/// [`Error::WouldDeadlock`] when called inside a read-side section or from a
/// deferred function.
#[cfg(feature = "std")]
pub fn synchronize() -> Result<(), Error> {
    Domain::global().synchronize()
}

/// [`Domain::call`] on [`Domain::global`].
#[cfg(feature = "std")]
pub fn call(f: impl FnOnce() + Send + 'static) {
    Domain::global().call(f);
}

/// [`Domain::barrier`] on [`Domain::global`].
///
/// # Errors
/// [`Error::WouldDeadlock`] when called inside a read-side section or from a
/// deferred function.
#[cfg(feature = "std")]
pub fn barrier() -> Result<(), Error> {
    Domain::global().barrier()
}

/// [`Domain::pending`] on [`Domain::global`].
#[cfg(feature = "std")]
pub fn pending() -> usize {
    Domain::global().pending()
}

/// What an embedder without `std` supplies to an SRCU [`Domain`]: which
/// reader the calling context uses, how to wait, and the fence pair of the
/// read side. The std build has its own (thread-local readers,
/// `membarrier(2)` fences, sleeping back-off) and needs none.
///
/// # Safety
///
/// [`reader`](Backend::reader) must return a reader that
/// [`Domain::register_reader`] of the *same* domain handed out, and no other
/// execution context may use that reader from the moment a context enters a
/// read-side section with it until the section ends: a reader counts its
/// sections with plain loads and stores, so two contexts sharing one could
/// end a grace period early and let memory be freed under a reader. A reader
/// per task (thread) is always right; a reader per CPU is right only where a
/// section is never preempted or migrated. (A reader of another domain is
/// caught at run time and refused with a panic.)
///
/// The fences must pair: [`light_barrier`](Backend::light_barrier) on the
/// reader and [`heavy_barrier`](Backend::heavy_barrier) on the writer must
/// together order each side's earlier store before its later load (both
/// `fence(SeqCst)` does; a compiler fence with an inter-processor barrier on
/// every CPU running a reader does too, as `membarrier(2)` or an IPI).
pub unsafe trait Backend: Sync + 'static {
    /// The calling context's reader of `domain`.
    fn reader(&self, domain: &'static Domain) -> &'static Reader;

    /// Waits a little: called in every loop that waits for another context
    /// (a grace period, an interval invalidation in flight, deferred
    /// functions still running). A kernel yields to its scheduler here; a
    /// hypervisor pauses.
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// The reader's side of the fence pair; runs on every outermost
    /// `read_lock`.
    #[inline]
    fn light_barrier(&self) {
        sync::fence(Ordering::SeqCst);
    }

    /// The writer's side of the fence pair; runs twice per grace period.
    fn heavy_barrier(&self) {
        sync::fence(Ordering::SeqCst);
    }
}

/// The std build's fast reader of [`Domain::global`]: the section counter
/// lives directly in a thread-local (one `%fs`-relative load and store per
/// section, as liburcu's), and the domain's registry holds its address.
///
/// A registered address stays valid because the thread removes it, under the
/// registry lock, in a thread-local destructor that runs before the thread's
/// thread-local storage is freed, and the grace period reads registered
/// counters only while holding that lock ([`TlsCounter::load`] takes the
/// lock guard as its witness). After that destructor ran, the thread's
/// sections use a heap reader instead (the counter's `REGISTERED` bit is
/// cleared).
///
/// Not built under loom or shuttle, whose atomics cannot live in a constant
/// thread-local: there every reader is a heap reader, running the same
/// counter algorithm.
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub(crate) mod tls {
    use core::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::MutexGuard;

    /// Set in a thread's counter while its address is in the registry.
    pub(crate) const REGISTERED: usize = 1 << (usize::BITS - 2);

    std::thread_local! {
        static CTR: AtomicUsize = const { AtomicUsize::new(0) };
        static REG: Registration = const { Registration(Cell::new(None)) };
    }

    /// The address of one thread's counter, in the registry.
    pub(crate) struct TlsCounter(*const AtomicUsize);

    // SAFETY: the pointer is only dereferenced by `load`, under the registry
    // lock, while the owning thread keeps it valid (see the module docs); an
    // `AtomicUsize` may be read from any thread.
    unsafe impl Send for TlsCounter {}

    impl TlsCounter {
        /// The counter's value. `_registry` is the guard of the registry that
        /// holds `self`: while it is held the owning thread cannot finish
        /// exiting.
        #[inline]
        pub(crate) fn load<T>(&self, _registry: &MutexGuard<'_, T>) -> usize {
            // SAFETY: `self` is in the registry whose lock `_registry` holds
            // (callers pass the guard they found `self` through). An entry is
            // removed, under that lock, by the `Registration` destructor of its
            // thread before that thread's thread-local storage is freed, so
            // the pointee is alive for the whole borrow.
            unsafe { (*self.0).load(Ordering::Acquire) }
        }

        /// Whether this is the calling thread's counter.
        pub(crate) fn is_mine(&self) -> bool {
            CTR.with(|c| core::ptr::eq(c, self.0))
        }
    }

    /// Removes the thread's counter from the registry when the thread exits.
    struct Registration(Cell<Option<&'static super::Domain>>);

    impl Drop for Registration {
        fn drop(&mut self) {
            if let Some(domain) = self.0.take() {
                // From now on this thread reads through a heap reader.
                let _ = CTR.try_with(|c| c.fetch_and(!REGISTERED, Ordering::Relaxed));
                domain.unregister_tls();
            }
        }
    }

    /// The calling thread's counter as a registry entry, if this thread can
    /// still register one (its destructors have not run yet). `register`
    /// adds it to the registry; then the `REGISTERED` bit is set.
    pub(crate) fn register(
        domain: &'static super::Domain,
        register: impl FnOnce(TlsCounter),
    ) -> bool {
        REG.try_with(|r| {
            if r.0.get().is_some() {
                return;
            }
            let Ok(addr) = CTR.try_with(|c| c as *const AtomicUsize) else {
                return;
            };
            register(TlsCounter(addr));
            r.0.set(Some(domain));
            CTR.with(|c| c.fetch_or(REGISTERED, Ordering::Relaxed));
        })
        .is_ok()
            && CTR.with(|c| c.load(Ordering::Relaxed) & REGISTERED != 0)
    }

    /// Enters a section on the thread-local counter: `false` (nothing done)
    /// if this thread's counter is not registered. `gp` is the domain's
    /// global counter, `light` the read side's fence.
    #[inline(always)]
    pub(crate) fn enter(gp: &AtomicUsize, nest_mask: usize, light: impl FnOnce()) -> bool {
        CTR.with(|c| {
            let v = c.load(Ordering::Relaxed);
            // Registered and idle (depth 0, whatever the stale phase bit):
            // the outermost section, the common case, in one test.
            if v & (nest_mask | REGISTERED) == REGISTERED {
                c.store(gp.load(Ordering::Relaxed) | REGISTERED, Ordering::Relaxed);
                light();
                true
            } else if v & nest_mask != 0 {
                c.store(v + 1, Ordering::Relaxed);
                true
            } else {
                false
            }
        })
    }

    /// Ends a section entered with [`enter`] (`nest_mask`: the depth bits).
    #[inline(always)]
    pub(crate) fn exit(nest_mask: usize) {
        let _ = nest_mask;
        CTR.with(|c| {
            // The phase bit may stay when the depth drops to 0: an idle
            // counter is recognised by its depth alone. Release: everything
            // the section did happens-before a grace period that observes
            // the section ended.
            c.store(c.load(Ordering::Relaxed) - 1, Ordering::Release);
        })
    }

    /// The calling thread's counter (for `in_read_section`).
    pub(crate) fn current() -> usize {
        CTR.try_with(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;

    fn slot_count() -> usize {
        sync::lock(&Domain::global().registry).len()
    }

    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    /// Generous bound for "returns" (only reached on failure).
    const RETURNS: Duration = Duration::from_secs(30);

    /// A domain of its own, so its phase is not flipped by other tests.
    fn private_domain() -> &'static Domain {
        Box::leak(Box::new(Domain::new()))
    }

    fn slot(d: &'static Domain, ctr: usize) -> &'static Reader {
        let r = d.register_reader();
        r.ctr.store(ctr, Ordering::Relaxed);
        r
    }

    /// Runs `wait_for_readers` of `d` on a thread; the receiver yields once
    /// it returns.
    fn waiting(d: &'static Domain, phase: usize) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            d.wait_for_readers(phase, &mut d.waiter());
            let _ = tx.send(());
        });
        rx
    }

    #[test]
    fn flip_alternates_the_phase_and_keeps_one_nesting_unit() {
        let d = private_domain();
        assert_eq!(d.gp.load(Ordering::Relaxed), 1);
        assert_eq!(d.flip(), PHASE);
        assert_eq!(d.gp.load(Ordering::Relaxed), PHASE | 1);
        assert_eq!(d.flip(), 0);
        assert_eq!(d.gp.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn outermost_section_records_the_current_phase_nested_ones_count() {
        let d = private_domain();
        d.flip(); // as if a grace period were between its flips
        let s = slot(d, 0);
        s.enter();
        assert_eq!(s.ctr.load(Ordering::Relaxed), PHASE | 1);
        s.enter();
        assert_eq!(s.ctr.load(Ordering::Relaxed), PHASE | 2);
        s.exit();
        assert_eq!(s.ctr.load(Ordering::Relaxed), PHASE | 1);
        s.exit();
        assert_eq!(s.ctr.load(Ordering::Relaxed) & NEST_MASK, 0);
    }

    #[test]
    fn wait_skips_idle_slots_and_sections_of_the_new_phase() {
        for phase in [PHASE, 0] {
            let d = private_domain();
            slot(d, 0);
            slot(d, phase | 1);
            slot(d, phase | 3);
            waiting(d, phase)
                .recv_timeout(RETURNS)
                .expect("no slot is inside a section of the old phase");
        }
    }

    #[test]
    fn wait_blocks_until_a_section_of_the_old_phase_ends() {
        for (old, new) in [(0, PHASE), (PHASE, 0)] {
            let d = private_domain();
            let _idle = slot(d, 0);
            let reader = slot(d, old | 2);
            let done = waiting(d, new);
            assert!(
                done.recv_timeout(Duration::from_millis(50)).is_err(),
                "returned while a section of the old phase was running"
            );
            reader.exit();
            assert!(
                done.recv_timeout(Duration::from_millis(50)).is_err(),
                "returned while a nested section of the old phase was running"
            );
            reader.exit();
            done.recv_timeout(RETURNS)
                .expect("returns once the section ends");
        }
    }

    #[test]
    fn run_due_runs_exactly_the_functions_queued_before_the_snapshot() {
        let d = private_domain();
        let ran = Arc::new(StdAtomicUsize::new(0));
        for _ in 0..3 {
            let ran = ran.clone();
            d.call(Box::new(move || {
                ran.fetch_add(1, Ordering::Relaxed);
            }));
        }
        d.run_due(1);
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        d.run_due(1);
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        d.run_due(3);
        assert_eq!(ran.load(Ordering::Relaxed), 3);
        assert!(sync::lock(&d.deferred).unfinished.is_empty());
    }

    #[test]
    fn nested_sections_end_with_the_outermost() {
        let outer = read_lock();
        let inner = read_lock();
        assert_eq!(format!("{inner:?}"), "srcu::ReadGuard");
        drop(inner);
        assert!(in_read_section(), "the outer section is still running");
        drop(outer);
        assert!(!in_read_section());
    }

    #[test]
    fn waiting_from_a_deferred_function_is_refused() {
        let (tx, rx) = mpsc::channel();
        call(move || {
            let _ = tx.send((synchronize(), barrier()));
        });
        barrier().unwrap();
        let (s, b) = rx.recv_timeout(RETURNS).expect("the function ran");
        assert!(matches!(s, Err(Error::WouldDeadlock(_))), "{s:?}");
        assert!(matches!(b, Err(Error::WouldDeadlock(_))), "{b:?}");
    }

    #[test]
    fn pending_counts_queued_and_running_functions() {
        let (release, gate) = mpsc::channel::<()>();
        call(move || {
            // Whichever thread runs it holds it until the assertion is done.
            let _ = gate.recv_timeout(RETURNS);
        });
        assert!(pending() >= 1);
        drop(release);
        barrier().unwrap();
    }

    #[test]
    fn every_thread_inside_a_section_has_its_own_slot() {
        let main = read_lock();
        let (entered, wait) = mpsc::channel();
        let (release, gate) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _g = read_lock();
            entered.send(()).unwrap();
            let _ = gate.recv_timeout(RETURNS);
        });
        wait.recv_timeout(RETURNS).unwrap();
        assert!(slot_count() >= 2, "{} slots", slot_count());
        drop(release);
        t.join().unwrap();
        drop(main);
    }

    #[test]
    fn exited_threads_slots_are_reused() {
        drop(read_lock());
        let before = slot_count();
        assert!(before >= 1, "this thread read, so it has a slot");
        for _ in 0..50 {
            std::thread::spawn(|| drop(read_lock())).join().unwrap();
        }
        // Other tests of this binary may run readers concurrently, so allow a
        // few extra slots, but 50 sequential threads must not need 50.
        assert!(
            slot_count() <= before + 8,
            "{} slots after 50 sequential threads (had {before})",
            slot_count()
        );
    }
}
