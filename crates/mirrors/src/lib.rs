//! Reference secondary MMUs, each a small pattern to copy, kept coherent
//! with a primary address space through `mmu-notifier`:
//!
//! | type | pattern | hooks used |
//! | --- | --- | --- |
//! | [`ShadowMmu`] | KVM shadow page tables | start/end with in-progress count, sequence and range; `change_pte`; young; `release` |
//! | [`DeviceMirror`] | HMM device page table, `lib/test_hmm.c` | one interval notifier; `range_fault` + `read_begin`/`read_retry` |
//! | [`SecondaryTlb`] | IOMMU SVA TLB | `arch_invalidate_secondary_tlbs`, `release` |
//! | [`MrCache`] | RDMA memory-region cache (a `regcache::RegCache` that pins) | one interval notifier per pinned registration |
//!
//! Every access a mirror makes through its own translation is checked by
//! the primary's coherence oracle. Mirrors reach the primary through the
//! [`Primary`] trait (implemented for `softmm::MmGrab`); [`DeviceMirror`]
//! needs the page-table walk and migration of the software MMU and uses it
//! directly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod device;
pub mod mr_cache;
mod primary;
pub mod shadow;
pub mod tlb;

pub use device::{Cmd, DeviceMirror, DmirrorError, Tag};
pub use mr_cache::{MrCache, MrEntry, PinRegistrar, PrimarySpace};
pub use primary::{FramePrimary, MirrorError, Primary, Result};
pub use shadow::{ShadowMmu, ShadowStats};
pub use tlb::{SecondaryTlb, TlbStats};
