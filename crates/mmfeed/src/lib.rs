//! A start/end feed of this process's own address-space changes, from eBPF,
//! driving [`mmu_notifier`]'s `invalidate_range_start` / `_end`.
//!
//! A user-space registration cache must drop a registration *before* the
//! memory under it can be reused. userfaultfd reports an munmap only after
//! the kernel freed the range and let go of the mmap lock (an *end*
//! notification), so an exact lookup has to ask the kernel every time
//! whether anything is still pending. Here, BPF programs on the system
//! calls that take memory away publish a START record at syscall **entry**
//! (before the call takes the mmap lock, so before any other thread can be
//! handed the freed addresses) and an END record at syscall **exit**, into
//! a feed this process maps. A lookup checks "anything new?" with one
//! acquire load.
//!
//! * [`Feed`]: the programs attached and this process's feed mapped (one per
//!   process).
//! * [`FeedMm`]: the address space whose `Subscriptions` the feed drives,
//!   and a [`regcache::AddressSpace`]: `RegCache<FeedMm, R>` is a
//!   registration cache on real memory for any device `R`.
//! * [`ProcessSpace`]: the best source this machine allows (the helper's
//!   feed, a program set pinned in bpffs, a feed loaded here, else
//!   userfaultfd), with the choice reported ([`ActivePath`]).
//! * `mmfeed-helper` (a binary of this crate, [`serve`]): loads the
//!   programs once for the host and hands each client process a feed of
//!   its own calls over a Unix socket; clients need no capability.
//!
//! # What is covered
//! munmap; mremap (a shrink's tail, a move's source, the target a
//! `MREMAP_FIXED` move replaces); mmap with `MAP_FIXED` over a mapping;
//! madvise `DONTNEED`, `DONTNEED_LOCKED`, `FREE`, `REMOVE`, `GUARD_INSTALL`;
//! brk shrinking the heap; as "everything changed", shmdt, shmat with
//! `SHM_REMAP`, io_destroy (the AIO ring) and process_madvise; and
//! io_uring's `IORING_OP_MADVISE` with the same advice values, whose START
//! is published when the request is queued for its io-wq worker and whose
//! END when its completion is posted. Threads created later, io-wq workers
//! and SQPOLL threads are covered (the programs filter by process).
//!
//! A MADVISE submitted with `IOSQE_CQE_SKIP_SUCCESS` posts no completion
//! when it succeeds, so its end cannot be seen: the feed invalidates its
//! range and from then on [`FeedMm::flush`] fails with
//! [`FeedError::Unpaired`] rather than pretend to be exact.
//!
//! Not covered, as with userfaultfd: truncation or hole-punch of a shared
//! file mapped here, compat (32-bit) system calls, `UFFDIO_MOVE`, and
//! unmaps a driver makes itself.
//!
//! # Attach points
//! [`Programs::load`] attaches the programs to the `syscalls:*` tracepoints
//! (one program per call's entry and exit) and, where a kernel lacks them,
//! to the BTF raw tracepoints `sys_enter` / `sys_exit` (`tp_btf`: one
//! program for every call, picking the fed ones by number; x86-64). The
//! environment variable `MMFEED_ATTACH` (`tracepoints`, `tp_btf`) chooses
//! instead; [`Feed::attach_point`] says which is in use. io_uring's MADVISE
//! is on the `io_uring:*` tracepoints either way. fentry/fexit on the
//! calls' own functions would spare the calls the feed ignores the tax, but
//! the kernel this was developed on refuses fentry programs (EPERM, even to
//! root), so there are none: they could not have been tested.
//!
//! # Requirements
//! Loading needs CAP_BPF and CAP_PERFMON (or root) and a kernel with BTF.
//! Enabling the `syscalls` tracepoints makes **every** system call of
//! **every** process on the host take the kernel's traced path; the README
//! gives the measured cost and how to turn the feed off.
#![warn(missing_docs)]
// Every `unsafe` block lives in `sys` (the mapping of the feed), each with
// a `// SAFETY:` argument; the other modules cannot add one.
#![deny(unsafe_code)]

mod error;
mod feed;
mod helper;
mod loader;
mod process;
mod ring;
mod space;
#[allow(unsafe_code)]
mod sys;

pub use error::FeedError;
pub use feed::{Feed, FeedSource};
pub use helper::{serve, socket_path, DEFAULT_SOCKET};
pub use loader::{pin_dir, AttachPoint, FeedMap, Programs, ATTACH_ENV, DEFAULT_PIN_DIR};
pub use process::{ActivePath, NoSource, ProcessSpace, SpaceError};
pub use ring::{Kind, Record, SLOTS};
pub use space::{FeedMm, FeedStats};
