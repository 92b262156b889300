//! Errors of the process backend, each with the remedy in its message.

use rustix::io::Errno;

/// Why the process backend refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// No userfaultfd could be opened.
    #[error("{}", unavailable_message(*.syscall, *.dev))]
    Unavailable {
        /// The error of the `userfaultfd` syscall.
        syscall: Errno,
        /// The error of opening `/dev/userfaultfd`.
        dev: Errno,
    },
    /// The kernel refused the API handshake or the event features.
    #[error("userfaultfd UFFDIO_API failed ({0}): the kernel lacks the UNMAP/REMOVE/REMAP events or write-protect mode (needs Linux 5.7 or later)")]
    Api(Errno),
    /// A range could not be registered with the userfaultfd.
    #[error("{}", register_message(*.start, *.len, *.errno))]
    Register {
        /// First address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The kernel's error.
        errno: Errno,
    },
    /// A range could not be populated (the pin of a registration).
    #[error("cannot fault in {start:#x}+{len:#x} ({errno}): not mapped, or not {access}")]
    Populate {
        /// First address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The kernel's error.
        errno: Errno,
        /// "writable" or "readable".
        access: &'static str,
    },
    /// The range is empty, unaligned or beyond the user address space.
    #[error("bad range {start:#x}+{len:#x}: must be nonzero and inside the user address space")]
    BadRange {
        /// First address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// This is a child forked after the `ProcessMm` was made: the parent's
    /// registrations describe the parent's pages.
    #[error("this process was forked after the ProcessMm was created: the child must create its own (the parent's registrations do not describe the child's pages)")]
    Forked,
    /// The `ProcessMm` was shut down or its monitor thread stopped.
    #[error("the process monitor stopped ({0}): invalidations can no longer be delivered")]
    Dead(String),
    /// The monitor thread could not be started.
    #[error("cannot start the userfaultfd monitor thread: {0}")]
    Thread(std::io::Error),
    /// The subsystem refused (an interval notifier insert or remove).
    #[error(transparent)]
    Notifier(mmu_notifier::Error),
    /// A descriptor or mapping the monitor needs could not be made.
    #[error("cannot set up the process monitor ({0})")]
    Setup(Errno),
}

fn unavailable_message(syscall: Errno, dev: Errno) -> String {
    let why = if syscall == Errno::NOSYS {
        "the userfaultfd syscall is missing or blocked: a kernel without CONFIG_USERFAULTFD, or a seccomp filter (Docker's default profile blocks it; run with --security-opt seccomp=unconfined or allow userfaultfd in the profile)"
    } else if syscall == Errno::PERM || syscall == Errno::ACCESS {
        "permission denied: allow it with `sysctl vm.unprivileged_userfaultfd=1`, give the process CAP_SYS_PTRACE, or make /dev/userfaultfd accessible to this user (chmod/chgrp)"
    } else {
        "the kernel refused"
    };
    format!("userfaultfd unavailable (syscall: {syscall}; /dev/userfaultfd: {dev}): {why}")
}

fn register_message(start: u64, len: u64, errno: Errno) -> String {
    let why = if errno == Errno::INVAL {
        "only anonymous, shmem (MAP_SHARED anonymous, memfd, tmpfs) and hugetlbfs mappings can be registered, not mappings of regular files or device memory; register such memory through an anonymous or memfd mapping"
    } else if errno == Errno::NOMEM {
        "part of the range is not mapped"
    } else if errno == Errno::BUSY {
        "another userfaultfd already watches part of the range"
    } else {
        "the kernel refused"
    };
    format!("cannot watch {start:#x}+{len:#x} with userfaultfd ({errno}): {why}")
}
