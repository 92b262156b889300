//! `softmm`: a software primary MMU for the `mmu-notifier` crate.
//!
//! An [`Mm`] is an address space with VMAs, a page table and frames from a
//! shared [`PhysMem`]. Every operation calls the MMU-notifier hooks of its
//! [`Subscriptions`](mmu_notifier::Subscriptions) where Linux's core mm does
//! (the README's call-site table), in the same order relative to PTE changes and frame
//! frees: munmap, mremap, mprotect, madvise, faults with COW, fork, KSM,
//! migration (system and device), device-exclusive entries, reclaim (aging
//! and swap-out), soft-dirty, writeback, exit and the OOM reaper, plus
//! transparent huge pages (fault, split, collapse: `ops::huge`) and hugetlb
//! memory ([`MapKind::Hugetlb`]). Secondary
//! MMUs use [`MmapRead::range_fault`] (hmm_range_fault, a method of the mmap read lock) and [`Mm::pin`]
//! (pin_user_pages), and check every access they make with the coherence
//! [`Oracle`].
//!
//! ```
//! use std::sync::Arc;
//! use mmu_notifier::{IntervalNotifier, IntervalOps, Range};
//! use softmm::{MapKind, Mm, PhysMem, Prot};
//!
//! struct Dev;
//! impl IntervalOps for Dev {
//!     fn invalidate(&self, sub: &IntervalNotifier, _r: &Range, seq: u64) -> bool {
//!         sub.set_seq(seq); // (and drop device mappings, under the device lock)
//!         true
//!     }
//! }
//!
//! let phys = PhysMem::new(256);
//! let mm = Mm::new(&phys);
//! let a = mm.mmap(4 * 4096, Prot::RW, MapKind::AnonPrivate).unwrap();
//! let sub = mm.subscriptions().interval_insert(a, 4 * 4096, Arc::new(Dev)).unwrap();
//! mm.write(a, &[7]).unwrap();
//!
//! // The device's fault path (the HMM pattern).
//! let seq = sub.read_begin().unwrap();
//! let mut range = softmm::HmmRange::new(&sub, seq, a, a + 4096);
//! range.fault = true;
//! let g = mm.mmap_read();
//! g.range_fault(&mut range).unwrap();
//! drop(g);
//! assert!(!sub.read_retry(seq));
//! let frame = range.pfns[0].frame.unwrap();
//! phys.oracle().check_access(&mm, a, frame, false).unwrap();
//!
//! mm.munmap(a, 4 * 4096).unwrap(); // invalidates the device first
//! assert!(phys.oracle().check_access(&mm, a, frame, false).is_err());
//! sub.remove().unwrap();
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod frame;
mod hmm;
mod mm;
pub mod ops;
mod oracle;
mod pfn;
mod pte;
mod trace;
mod verdict;
mod vma;

pub use error::{Error, Result};
pub use frame::{DevicePagemap, FrameKind, FrameStats, PhysMem, HPAGE_PMD_NR};
pub use hmm::{HmmPfn, HmmRange, PinnedPages, PMD_ORDER};
pub use mm::{Mm, MmGrab, MmapRead, MmapWrite, GATHER_BATCH, MMAP_BASE, TASK_SIZE};
pub use ops::huge::{Collapse, MAX_PTES_NONE, MAX_PTES_SHARED};
pub use ops::map::{pages, OomReport};
pub use ops::migrate::MigratedPage;
pub use pfn::{FrameRef, ZERO_PFN};
pub use pte::{Pte, PteKind, PMD_SIZE, PUD_SIZE};
pub use trace::{Op, TraceEntry};
pub use verdict::{Oracle, OracleObserver, Violation, ViolationKind};
pub use vma::{Backing, MapKind, Prot, SharedObject, Vma};

/// Page size (4 KiB).
pub const PAGE_SIZE: u64 = mmu_notifier::PAGE_SIZE;
