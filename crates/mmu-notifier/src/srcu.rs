//! A sleepable read-copy-update (SRCU) grace-period domain.
//!
//! Like Linux, the subsystem uses **one** domain for every address space in the
//! process. Notifier callbacks run inside a read-side section and may block.
//! [`synchronize`] waits for every read-side section that started before it,
//! on any thread. [`call`] queues a deferred function (Linux's `call_srcu`) that
//! runs after a later grace period, and [`barrier`] waits until every function
//! queued before it has run.
//!
//! # Algorithm
//!
//! The liburcu "memb" scheme with per-thread reader slots:
//!
//! * Each thread that ever reads owns a slot holding a counter: bits below
//!   `PHASE` are its nesting depth, bit `PHASE` the grace-period phase it
//!   started in. The outermost `read_lock` copies the global counter (phase plus
//!   a nesting unit) into the slot and runs the reader's light fence; nested
//!   ones just increment. `read_unlock` decrements with a release store. No
//!   read-modify-write and no hardware fence on the read side.
//! * A grace period takes the writer's heavy fence (see the crate-private `barrier` module),
//!   flips the phase and waits until no slot is inside a section of the old
//!   phase, flips again and waits again, then takes the heavy fence. Two flips
//!   are needed because a reader may read the phase just before a flip and
//!   publish it just after the wait scanned its slot.
//!
//! This crate starts no threads. Deferred functions run at the end of the next
//! grace period anyone completes (every `unregister`, every address-space exit
//! and every [`synchronize`] / [`barrier`] call drains the ones that are due),
//! so, exactly as with Linux modules, code that relies on them having run must
//! call [`barrier`] (re-exported as [`crate::synchronize`]).
//!
//! ```
//! use mmu_notifier::srcu;
//! let guard = srcu::read_lock();
//! assert!(srcu::in_read_section());
//! drop(guard);
//! srcu::synchronize().unwrap();
//! ```

use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::marker::PhantomData;

use crate::barrier::Flavour;
use crate::sync::{self, fence, AtomicUsize, Condvar, Mutex, Ordering};
use crate::Error;

/// Phase bit of a reader counter (the top bit).
const PHASE: usize = 1 << (usize::BITS - 1);
/// Nesting-depth bits of a reader counter.
const NEST_MASK: usize = PHASE - 1;

/// A deferred function queued by [`call`].
type Deferred = Box<dyn FnOnce() + Send + 'static>;

struct DeferredQueue {
    next_ticket: u64,
    queue: VecDeque<(u64, Deferred)>,
    /// Tickets queued or running, so [`barrier`] can wait for exactly the ones
    /// queued before it.
    unfinished: BTreeSet<u64>,
}

struct Domain {
    /// Global counter: `PHASE` bit plus one nesting unit, copied by readers.
    gp: AtomicUsize,
    /// Every reader slot ever handed out. Slots are leaked (`&'static`) so the
    /// read side reaches its own through a plain thread-local pointer, and
    /// recycled when their thread exits; their number is bounded by the
    /// largest number of threads that were alive at once.
    readers: Mutex<Vec<&'static ReaderSlot>>,
    /// Serialises grace periods.
    gp_lock: Mutex<()>,
    flavour: Flavour,
    deferred: Mutex<DeferredQueue>,
    deferred_done: Condvar,
}

/// One thread's reader state.
struct ReaderSlot {
    ctr: AtomicUsize,
    /// The domain, so the read side needs no lazy-static check.
    domain: &'static Domain,
    /// Copied from the domain: the read side's fence, without a second load.
    flavour: Flavour,
    /// Not owned by a live thread; `assign_slot` may hand it out again.
    #[cfg_attr(loom, allow(dead_code))]
    free: std::sync::atomic::AtomicBool,
}

#[cfg(not(any(loom, shuttle)))]
static DOMAIN: std::sync::LazyLock<Domain> = std::sync::LazyLock::new(Domain::new);

// Under the model checkers the domain is created afresh for every execution.
#[cfg(loom)]
loom::lazy_static! {
    static ref DOMAIN: Domain = Domain::new();
}
#[cfg(shuttle)]
shuttle::lazy_static! {
    static ref DOMAIN: Domain = Domain::new();
}

fn domain() -> &'static Domain {
    &DOMAIN
}

// The read side's thread-locals have constant initialisers and no destructor,
// so an access is a bare thread-pointer-relative load: no lazy-init or
// destructor-state check on the fast path.
#[cfg(not(loom))]
sync::thread_local! {
    static SLOT: Cell<Option<&'static ReaderSlot>> = const { Cell::new(None) };
    static IN_DEFERRED: Cell<bool> = const { Cell::new(false) };
    /// Returns this thread's slot to the pool when the thread exits.
    static SLOT_RETURN: SlotReturn = const { SlotReturn(Cell::new(None)) };
}

#[cfg(loom)]
loom::thread_local! {
    static SLOT: Cell<Option<&'static ReaderSlot>> = Cell::new(None);
    static IN_DEFERRED: Cell<bool> = Cell::new(false);
}

#[cfg(not(loom))]
struct SlotReturn(Cell<Option<&'static ReaderSlot>>);

#[cfg(not(loom))]
impl Drop for SlotReturn {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            // A destructor that runs later on this thread and reads gets a
            // fresh slot (see `assign_slot`) instead of this one.
            let _ = SLOT.try_with(|s| s.set(None));
            // A slot whose thread leaked a guard (mem::forget) stays nested;
            // never recycle it.
            if slot.ctr.load(Ordering::Relaxed) & NEST_MASK == 0 {
                slot.free.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }
}

/// This thread's reader slot.
#[inline(always)]
fn local_slot() -> &'static ReaderSlot {
    match SLOT.with(Cell::get) {
        Some(slot) => slot,
        None => assign_slot(),
    }
}

/// First read on this thread: reuse a slot of an exited thread or leak a new one.
#[cold]
#[inline(never)]
fn assign_slot() -> &'static ReaderSlot {
    let d = domain();
    let slot = {
        let mut readers = sync::lock(&d.readers);
        #[cfg(not(loom))]
        let reused = readers.iter().copied().find(|s| {
            s.free
                .compare_exchange(
                    true,
                    false,
                    std::sync::atomic::Ordering::Acquire,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        });
        #[cfg(loom)]
        let reused = None;
        match reused {
            Some(s) => s,
            None => {
                let s: &'static ReaderSlot = Box::leak(Box::new(ReaderSlot {
                    ctr: AtomicUsize::new(0),
                    domain: d,
                    flavour: d.flavour,
                    free: std::sync::atomic::AtomicBool::new(false),
                }));
                readers.push(s);
                s
            }
        }
    };
    SLOT.with(|c| c.set(Some(slot)));
    // If this thread is already exiting the return hook cannot be installed
    // and the slot is simply never recycled.
    #[cfg(not(loom))]
    let _ = SLOT_RETURN.try_with(|r| r.0.set(Some(slot)));
    slot
}

/// Waits until no slot of `readers` is inside a section that began before the
/// global phase became `phase`: an idle slot, or one whose outermost section
/// copied `phase`, needs no wait.
fn wait_for_readers(readers: &[&'static ReaderSlot], phase: usize) {
    for slot in readers {
        let mut backoff = sync::Backoff::new();
        loop {
            let c = slot.ctr.load(Ordering::Acquire);
            if c & NEST_MASK == 0 || c & PHASE == phase {
                break;
            }
            backoff.snooze();
        }
    }
}

impl Domain {
    fn new() -> Domain {
        Domain {
            gp: AtomicUsize::new(1),
            readers: Mutex::new(Vec::new()),
            gp_lock: Mutex::new(()),
            flavour: Flavour::detect(),
            deferred: Mutex::new(DeferredQueue {
                next_ticket: 0,
                queue: VecDeque::new(),
                unfinished: BTreeSet::new(),
            }),
            deferred_done: Condvar::new(),
        }
    }

    /// Waits for every read-side section that started before this call.
    fn grace_period(&self) {
        let _serial = sync::lock(&self.gp_lock);
        // A thread that registers after this snapshot starts its first section
        // after the grace period began, so it need not be waited for; taking the
        // registry lock also orders its later loads after our earlier stores.
        let readers: Vec<&'static ReaderSlot> = sync::lock(&self.readers).clone();
        self.flavour.heavy();
        for _ in 0..2 {
            let phase = self.flip();
            fence(Ordering::SeqCst);
            wait_for_readers(&readers, phase);
        }
        self.flavour.heavy();
    }

    /// Flips the global phase (keeping one nesting unit in the counter, which
    /// readers copy) and returns the new phase.
    fn flip(&self) -> usize {
        let phase = (self.gp.load(Ordering::Relaxed) ^ PHASE) & PHASE;
        self.gp.store(phase | 1, Ordering::Relaxed);
        phase
    }

    /// Queues `f` with the next ticket.
    fn call(&self, f: Deferred) {
        let mut q = sync::lock(&self.deferred);
        let t = q.next_ticket;
        q.next_ticket += 1;
        q.queue.push_back((t, f));
        q.unfinished.insert(t);
    }

    fn next_ticket(&self) -> u64 {
        sync::lock(&self.deferred).next_ticket
    }

    /// Runs every queued function whose ticket is below `below`, i.e. that was
    /// queued before a grace period that has now completed.
    fn run_due(&self, below: u64) {
        loop {
            let item = {
                let mut q = sync::lock(&self.deferred);
                match q.queue.front() {
                    Some((t, _)) if *t < below => q.queue.pop_front(),
                    _ => None,
                }
            };
            let Some((ticket, f)) = item else { break };
            let was = IN_DEFERRED.with(|c| c.replace(true));
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            IN_DEFERRED.with(|c| c.set(was));
            if result.is_err() {
                tracing::error!("mmu_notifier: a deferred SRCU callback panicked");
            }
            let mut q = sync::lock(&self.deferred);
            q.unfinished.remove(&ticket);
            drop(q);
            self.deferred_done.notify_all();
        }
    }
}

/// Proof that this thread is inside an SRCU read-side section; the section ends
/// when it is dropped. Not `Send`: a section belongs to one thread.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct ReadGuard {
    slot: &'static ReaderSlot,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("srcu::ReadGuard")
    }
}

/// Enters a read-side section (Linux `srcu_read_lock`). Sections nest.
///
/// Costs a thread-local load, three loads and a store: no read-modify-write
/// and no hardware fence (see the module documentation).
#[inline]
pub fn read_lock() -> ReadGuard {
    let slot = local_slot();
    slot.enter();
    ReadGuard {
        slot,
        _not_send: PhantomData,
    }
}

impl ReaderSlot {
    /// The read side of `read_lock`: the outermost section copies the global
    /// counter (its phase plus one nesting unit) and runs the light fence;
    /// nested ones add a unit.
    #[inline(always)]
    fn enter(&self) {
        let c = self.ctr.load(Ordering::Relaxed);
        if c & NEST_MASK == 0 {
            self.ctr
                .store(self.domain.gp.load(Ordering::Relaxed), Ordering::Relaxed);
            self.flavour.light();
        } else {
            self.ctr.store(c + 1, Ordering::Relaxed);
        }
    }

    /// The end of a section: removes a unit, and the phase with the last one.
    #[inline(always)]
    fn exit(&self) {
        let c = self.ctr.load(Ordering::Relaxed);
        let next = if c & NEST_MASK == 1 { 0 } else { c - 1 };
        // Release: everything the section did happens-before a grace period
        // that observes the section ended.
        self.ctr.store(next, Ordering::Release);
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        self.slot.exit();
    }
}

/// Whether the calling thread is inside a read-side section (for example, in
/// a notifier callback). Waiting for a grace period there would deadlock.
pub fn in_read_section() -> bool {
    SLOT.try_with(Cell::get)
        .ok()
        .flatten()
        .is_some_and(|s| s.ctr.load(Ordering::Relaxed) & NEST_MASK != 0)
}

fn in_deferred() -> bool {
    IN_DEFERRED.try_with(Cell::get).unwrap_or(false)
}

fn check_may_wait(what: &'static str) -> Result<(), Error> {
    if in_read_section() || in_deferred() {
        tracing::warn!("mmu_notifier: {what} from inside an SRCU read-side section or deferred callback refused (would deadlock)");
        return Err(Error::WouldDeadlock(what));
    }
    crate::debug::might_sleep();
    Ok(())
}

/// Waits for a grace period (Linux `synchronize_srcu`): every read-side section
/// that started before this call has ended when it returns. Deferred functions
/// that are due then run on this thread.
///
/// # Errors
/// [`Error::WouldDeadlock`] when called inside a read-side section or from a
/// deferred function.
pub fn synchronize() -> Result<(), Error> {
    check_may_wait("srcu::synchronize")?;
    synchronize_unchecked();
    Ok(())
}

/// The grace period plus the deferred drain, for callers that checked.
pub(crate) fn synchronize_unchecked() {
    let d = domain();
    let below = d.next_ticket();
    d.grace_period();
    d.run_due(below);
}

/// Queues `f` to run after a grace period (Linux `call_srcu`). Never blocks.
pub fn call(f: impl FnOnce() + Send + 'static) {
    domain().call(Box::new(f));
}

/// Waits until every function queued with [`call`] before this call has run
/// (Linux `srcu_barrier`, which is what `mmu_notifier_synchronize` documents).
///
/// # Errors
/// [`Error::WouldDeadlock`] when called inside a read-side section or from a
/// deferred function.
pub fn barrier() -> Result<(), Error> {
    check_may_wait("srcu::barrier")?;
    let d = domain();
    let below = d.next_ticket();
    d.grace_period();
    d.run_due(below);
    // Another thread may have taken some of our functions and still be running
    // them: wait for those too.
    let mut q = sync::lock(&d.deferred);
    while q.unfinished.range(..below).next().is_some() {
        q = sync::wait(&d.deferred_done, q);
    }
    Ok(())
}

/// Number of deferred functions queued or running.
pub fn pending() -> usize {
    sync::lock(&domain().deferred).unfinished.len()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn slot_count() -> usize {
        sync::lock(&domain().readers).len()
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

    fn slot(d: &'static Domain, ctr: usize) -> &'static ReaderSlot {
        Box::leak(Box::new(ReaderSlot {
            ctr: AtomicUsize::new(ctr),
            domain: d,
            flavour: d.flavour,
            free: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Runs `wait_for_readers` on a thread; the receiver yields once it returns.
    fn waiting(readers: Vec<&'static ReaderSlot>, phase: usize) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            wait_for_readers(&readers, phase);
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
        let d = private_domain();
        for phase in [PHASE, 0] {
            let readers = vec![slot(d, 0), slot(d, phase | 1), slot(d, phase | 3)];
            waiting(readers, phase)
                .recv_timeout(RETURNS)
                .expect("no slot is inside a section of the old phase");
        }
    }

    #[test]
    fn wait_blocks_until_a_section_of_the_old_phase_ends() {
        let d = private_domain();
        for (old, new) in [(0, PHASE), (PHASE, 0)] {
            let reader = slot(d, old | 2);
            let done = waiting(vec![slot(d, 0), reader], new);
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
