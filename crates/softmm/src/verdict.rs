//! What the coherence oracle found, and its record: [`Violation`] and
//! [`ViolationKind`], the [`OracleObserver`], and the [`Oracle`]'s counts
//! and kept violations. Each [`PhysMem`](crate::PhysMem) owns one record;
//! the checks themselves (which read address spaces and pins) are in
//! `oracle.rs`, above the address space in the module order, so physical
//! memory does not depend on them.

use mmu_notifier::sync::{self, AtomicU64, Mutex, Ordering, RwLock};
use std::fmt;

use crate::pfn::FrameRef;
use crate::pte::Pte;
use crate::trace::TraceEntry;

/// Violations kept with their traces (all are counted).
const KEPT: usize = 16;

/// Why an access was not coherent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// The primary maps nothing there.
    NotMapped,
    /// The primary maps another frame there (or a swap entry: `None`).
    WrongFrame {
        /// What the primary maps.
        mapped: Option<u64>,
    },
    /// The primary maps the frame without the permission used.
    Permission,
    /// The frame was freed (and perhaps reused) since the secondary took it.
    FrameFreed {
        /// The frame's generation now.
        current_gen: u64,
    },
    /// A pinned registration was used after unpin, outside its range, or
    /// for a write it was not pinned for.
    NotPinned,
}

/// One incoherent access, with the operations that led to it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Address space id.
    pub mm: u64,
    /// Virtual address accessed.
    pub vaddr: u64,
    /// Frame the secondary used.
    pub frame: FrameRef,
    /// Whether it was a write.
    pub write: bool,
    /// What was wrong.
    pub kind: ViolationKind,
    /// The primary's PTE at that address at the moment of the check.
    pub pte: Option<Pte>,
    /// Recent operations of the address space, oldest first.
    pub trace: Vec<TraceEntry>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "incoherent {} of mm {} at {:#x} through frame {} gen {}: {:?}",
            if self.write { "write" } else { "read" },
            self.mm,
            self.vaddr,
            self.frame.pfn,
            self.frame.gen,
            self.kind
        )?;
        writeln!(f, "primary PTE now: {:?}", self.pte)?;
        writeln!(f, "recent operations (* = covers the address):")?;
        for t in &self.trace {
            let hit = t.start <= self.vaddr && self.vaddr < t.end;
            writeln!(f, " {} {t}", if hit { '*' } else { ' ' })?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Counts checks and keeps the first violations. One per [`PhysMem`]
/// (`phys.oracle()`); cheap enough to stay on in stress runs (one lock of the
/// page-table store and a few loads per check).
///
/// [`PhysMem`]: crate::PhysMem
#[derive(Default)]
pub struct Oracle {
    checks: AtomicU64,
    violations: AtomicU64,
    kept: Mutex<Vec<Violation>>,
    observer: RwLock<Option<std::sync::Arc<dyn OracleObserver>>>,
}

/// Sees every check as it happens (tracing tools; `mmun --trace`).
pub trait OracleObserver: Send + Sync + 'static {
    /// One check of address space `mm` at `vaddr`; `violation` when it
    /// failed. Called on the checking thread, with the secondary's locks
    /// held: keep it short and do not call back into the primary.
    fn checked(&self, mm: u64, vaddr: u64, write: bool, violation: Option<&Violation>);
}

impl fmt::Debug for Oracle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oracle")
            .field("checks", &self.checks())
            .field("violations", &self.violation_count())
            .finish()
    }
}

impl Oracle {
    /// Counts one check.
    pub(crate) fn count_check(&self) {
        self.checks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `v` and keeps it if fewer than [`KEPT`] are kept.
    pub(crate) fn keep(&self, v: &Violation) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut kept = sync::lock(&self.kept);
        if kept.len() < KEPT {
            kept.push(v.clone());
        }
    }

    /// Installs (or with `None` removes) the observer of every check.
    pub fn set_observer(&self, observer: Option<std::sync::Arc<dyn OracleObserver>>) {
        *sync::write(&self.observer) = observer;
    }

    pub(crate) fn observe(&self, mm: u64, vaddr: u64, write: bool, violation: Option<&Violation>) {
        let obs = sync::read(&self.observer);
        if let Some(o) = obs.as_ref() {
            o.checked(mm, vaddr, write, violation);
        }
    }

    /// Accesses checked so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Violations found so far.
    pub fn violation_count(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// The first violations (up to 16), with traces.
    pub fn violations(&self) -> Vec<Violation> {
        sync::lock(&self.kept).clone()
    }
}
