//! The coherence oracle: checks a secondary's access at the moment it uses
//! a translation.
//!
//! An access through a secondary mapping is coherent when the primary maps
//! that frame at that address now with the needed permission, or a TLB may
//! still legitimately hold such an entry (it was downgraded and its flush
//! has not happened yet; the frame cannot have been freed then), or it is
//! the entry being installed by `set_pte_at_notify` (already announced to
//! `change_pte`). In every case the frame's generation must be current.
//! Pinned registrations are checked against the pin instead.
//!
//! Checking takes the page-table store lock (never the PTL), so secondaries
//! call it while holding their own locks.

use mmu_notifier::sync::{self, AtomicU64, Mutex, Ordering, RwLock};
use std::fmt;

use crate::frame::FrameRef;
use crate::hmm::Pin;
use crate::mm::MmGrab;
use crate::pte::Pte;
use crate::trace::TraceEntry;
use crate::PAGE_SIZE;

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

/// Whether `pte` lets an access to `pfn` happen.
fn grants(pte: &Pte, pfn: u64, write: bool) -> Result<(), ViolationKind> {
    let (mapped, read, writable) = pte.access();
    if mapped != Some(pfn) {
        return Err(ViolationKind::WrongFrame { mapped });
    }
    if (write && writable) || (!write && read) {
        Ok(())
    } else {
        Err(ViolationKind::Permission)
    }
}

impl Oracle {
    /// Checks that a secondary may access `vaddr` of `mm` through `frame`
    /// now (for writing if `write`). Call it at the moment of the access,
    /// with the secondary's own lock held.
    ///
    /// # Errors
    /// The [`Violation`], which is also counted and (the first few) kept.
    pub fn check_access(
        &self,
        mm: &MmGrab,
        vaddr: u64,
        frame: FrameRef,
        write: bool,
    ) -> Result<(), Box<Violation>> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let inner = &mm.inner;
        let vpn = vaddr / PAGE_SIZE;
        let verdict = {
            let pt = inner.pt();
            let pending = sync::lock(&inner.pending)
                .filter(|&(v, _)| v == vpn)
                .map(|(_, p)| p);
            let current = pt.get(vpn);
            let mut verdict = match current {
                None => Err(ViolationKind::NotMapped),
                Some(p) => grants(&p, frame.pfn, write),
            };
            for alt in pending.into_iter().chain(pt.unflushed(vpn)) {
                if verdict.is_err() && grants(&alt, frame.pfn, write).is_ok() {
                    verdict = Ok(());
                }
            }
            verdict.and_then(|()| {
                let gen = inner.phys.generation(frame.pfn);
                if gen == frame.gen {
                    Ok(())
                } else {
                    Err(ViolationKind::FrameFreed { current_gen: gen })
                }
            })
        };
        let r = verdict.map_err(|kind| self.report(mm, vaddr, frame, write, kind));
        self.observe(mm.id(), vaddr, write, r.as_ref().err().map(|v| &**v));
        r
    }

    /// Checks an access through a pinned registration: `vaddr` must be in
    /// the pin, the pin not released, the frame still pinned and of the same
    /// generation, and a write needs a pin for writing. (Whether the
    /// primary still maps that frame there is a separate question: ask
    /// [`check_access`](Self::check_access).)
    ///
    /// # Errors
    /// The [`Violation`].
    pub fn check_pinned(&self, pin: &Pin, vaddr: u64, write: bool) -> Result<(), Box<Violation>> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let phys = &pin.mm.inner.phys;
        let frame = pin.frame_at(vaddr);
        let ok = match frame {
            Some(f) => {
                !pin.is_released()
                    && (!write || pin.writable())
                    && phys.is_current(f)
                    && phys.pincount(f.pfn) > 0
            }
            None => false,
        };
        if ok {
            self.observe(pin.mm.id(), vaddr, write, None);
            return Ok(());
        }
        let f = frame.unwrap_or(FrameRef { pfn: 0, gen: 0 });
        let v = self.report(&pin.mm, vaddr, f, write, ViolationKind::NotPinned);
        self.observe(pin.mm.id(), vaddr, write, Some(&v));
        Err(v)
    }

    fn report(
        &self,
        mm: &MmGrab,
        vaddr: u64,
        frame: FrameRef,
        write: bool,
        kind: ViolationKind,
    ) -> Box<Violation> {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let v = Box::new(Violation {
            mm: mm.id(),
            vaddr,
            frame,
            write,
            kind,
            pte: mm.pte(vaddr),
            trace: mm.inner.trace.recent(),
        });
        let mut kept = sync::lock(&self.kept);
        if kept.len() < KEPT {
            kept.push((*v).clone());
        }
        v
    }

    /// Installs (or with `None` removes) the observer of every check.
    pub fn set_observer(&self, observer: Option<std::sync::Arc<dyn OracleObserver>>) {
        *sync::write(&self.observer) = observer;
    }

    fn observe(&self, mm: u64, vaddr: u64, write: bool, violation: Option<&Violation>) {
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
