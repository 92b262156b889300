//! A short ring of recent operations per address space, attached to oracle
//! violations so a failure shows what led to it.

use mmu_notifier::sync::{self, AtomicU64, Mutex, Ordering};
use std::collections::VecDeque;
use std::fmt;

use mmu_notifier::Event;

/// Operations of the software MMU (for counters and the trace).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Op {
    /// `mmap`.
    Mmap,
    /// `munmap`.
    Munmap,
    /// `mremap`.
    Mremap,
    /// `mprotect`.
    Mprotect,
    /// `madvise(MADV_DONTNEED)`.
    MadviseDontneed,
    /// `madvise(MADV_FREE)`.
    MadviseFree,
    /// A CPU page fault (any kind).
    Fault,
    /// A COW break (`wp_page_copy`).
    CowFault,
    /// `fork`.
    Fork,
    /// KSM merge of identical pages.
    KsmMerge,
    /// System page migration (NUMA, compaction).
    Migrate,
    /// Migration to device-private memory.
    MigrateToDevice,
    /// Migration from device-private memory back to system memory.
    MigrateToRam,
    /// Making pages device-exclusive.
    MakeExclusive,
    /// A CPU access revoking device-exclusive access.
    RevokeExclusive,
    /// Reclaim aging (clear_flush_young / clear_young / test_young).
    Age,
    /// Reclaim unmap (swap-out or discard).
    SwapOut,
    /// Soft-dirty clear (`clear_refs` 4).
    SoftDirtyClear,
    /// Writeback cleaning of shared pages.
    Writeback,
    /// Address-space exit.
    Exit,
    /// OOM reap.
    OomReap,
    /// `range_fault` (hmm_range_fault).
    RangeFault,
    /// `pin` (pin_user_pages).
    Pin,
    /// `madvise(MADV_HUGEPAGE)` or `madvise(MADV_NOHUGEPAGE)`.
    MadviseHugepage,
    /// A PMD mapping split into PTEs (`__split_huge_pmd`), alone or as the
    /// first step of a THP split (`split_huge_page`).
    SplitHugePmd,
    /// khugepaged's collapse of a block of base pages into a THP.
    Collapse,
    /// Start of an invalidation.
    InvalidateStart,
    /// End of an invalidation.
    InvalidateEnd,
    /// A primary TLB flush (secondary-TLB hook).
    TlbFlush,
}

impl Op {
    /// The primary-MMU operations (what the per-op counters count).
    pub const OPERATIONS: [Op; 26] = [
        Op::Mmap,
        Op::Munmap,
        Op::Mremap,
        Op::Mprotect,
        Op::MadviseDontneed,
        Op::MadviseFree,
        Op::Fault,
        Op::CowFault,
        Op::Fork,
        Op::KsmMerge,
        Op::Migrate,
        Op::MigrateToDevice,
        Op::MigrateToRam,
        Op::MakeExclusive,
        Op::RevokeExclusive,
        Op::Age,
        Op::SwapOut,
        Op::SoftDirtyClear,
        Op::Writeback,
        Op::Exit,
        Op::OomReap,
        Op::RangeFault,
        Op::Pin,
        Op::MadviseHugepage,
        Op::SplitHugePmd,
        Op::Collapse,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One traced step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// Global order of the step (machine-wide).
    pub seq: u64,
    /// What happened.
    pub op: Op,
    /// Event of an invalidation step.
    pub event: Option<Event>,
    /// Range start.
    pub start: u64,
    /// Range end (exclusive).
    pub end: u64,
}

impl fmt::Display for TraceEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {:?}", self.seq, self.op)?;
        if let Some(e) = self.event {
            write!(f, " {e:?}")?;
        }
        write!(f, " [{:#x}, {:#x})", self.start, self.end)
    }
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const CAPACITY: usize = 256;

/// The ring plus per-operation counters of one address space.
#[derive(Default)]
pub(crate) struct Trace {
    ring: Mutex<VecDeque<TraceEntry>>,
    counts: [AtomicU64; Op::OPERATIONS.len() + 3],
}

impl Trace {
    pub(crate) fn record(&self, op: Op, event: Option<Event>, start: u64, end: u64) {
        self.counts[op.index()].fetch_add(1, Ordering::Relaxed);
        let e = TraceEntry {
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            op,
            event,
            start,
            end,
        };
        let mut r = sync::lock(&self.ring);
        if r.len() == CAPACITY {
            r.pop_front();
        }
        r.push_back(e);
    }

    pub(crate) fn recent(&self) -> Vec<TraceEntry> {
        let r = sync::lock(&self.ring);
        r.iter().copied().collect()
    }

    pub(crate) fn count(&self, op: Op) -> u64 {
        self.counts[op.index()].load(Ordering::Relaxed)
    }
}
