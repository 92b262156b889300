//! This process's own address space as a primary MMU for [`mmu_notifier`],
//! with invalidations fed from userfaultfd events: what user-space
//! registration caches (RDMA memory regions, io_uring fixed buffers, DMA
//! maps, GPU host registrations) need to drop a registration when the
//! application munmaps, mremaps or madvises the memory under it, without
//! patching libc (UCX, Open MPI and libfabric memhooks) or a kernel module.
//!
//! * [`ProcessMm`]: the address space; [`ProcessMm::watch`] and
//!   [`ProcessMm::interval_insert`] choose the ranges that produce events,
//!   [`ProcessMm::flush`] makes every change that has returned visible
//!   (and, with the default [`FlushScope::Started`], every change that has taken
//!   effect, including another thread's munmap still waiting for the
//!   monitor while a new mapping reuses its addresses).
//! * `regcache::RegCache<ProcessMm, R>`: a registration cache on real
//!   memory (`ProcessMm` implements [`regcache::AddressSpace`]) for any
//!   device `R` (io_uring fixed buffers: the `uring-registrar` crate;
//!   [`Populate`] for no device).
//!
//! Requirements: Linux 5.7 or later (write-protect registration, which
//! never makes the application wait on a page fault; see the `sys` module),
//! and a userfaultfd: available unprivileged through `UFFD_USER_MODE_ONLY`
//! (Linux 5.11), otherwise root, CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd=1`
//! or access to `/dev/userfaultfd`. [`UffdError`] says which remedy applies.
//!
//! Callbacks run on the monitor's handler thread, never on the thread that
//! reads events: a callback may block (on a lock, or in the allocator)
//! while application threads munmap watched memory, because the reader keeps
//! reading and so keeps their munmaps returning. Keep callbacks short all
//! the same: every lookup's flush waits for them.
#![warn(missing_docs)]
// Every `unsafe` block lives in `sys` (the syscall layer), each with a
// `// SAFETY:` argument; the other modules cannot add one.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod coverage;
mod error;
mod monitor;
mod process;
#[allow(unsafe_code)]
mod sys;

pub use error::UffdError;
pub use monitor::{FlushScope, MonitorStats};
pub use process::{Populate, ProcessInterval, ProcessMm, ProcessPin, Watch, USER_ADDRESS_LIMIT};
