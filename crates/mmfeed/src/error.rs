//! Why a feed could not be set up or read.

/// Why a feed could not be set up, or stopped working.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    /// The BPF object could not be loaded: the process lacks CAP_BPF and
    /// CAP_PERFMON (or CAP_SYS_ADMIN), the kernel has no BTF
    /// (`/sys/kernel/btf/vmlinux`), or it refused a program.
    #[error("loading the feed's BPF programs failed (needs CAP_BPF + CAP_PERFMON or root, and a kernel with BTF): {0}")]
    Load(String),
    /// `MMFEED_ATTACH` names no attach point (`tracepoints` or `tp_btf`).
    #[error("MMFEED_ATTACH={0:?}: expected `tracepoints` or `tp_btf`")]
    BadAttachPoint(String),
    /// A program could not be attached to its tracepoint.
    #[error("attaching to {category}:{tracepoint} failed (is tracefs mounted at /sys/kernel/tracing?): {why}")]
    Attach {
        /// The tracepoint's category (`syscalls`, `io_uring`).
        category: &'static str,
        /// The tracepoint.
        tracepoint: &'static str,
        /// What the kernel or loader said.
        why: String,
    },
    /// The privileged helper could not be reached, or refused.
    #[error("the mmfeed helper at {path:?}: {why}")]
    Helper {
        /// The socket tried.
        path: std::path::PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A program set could not be pinned in, or reused from, a bpffs
    /// directory.
    #[error("the pinned program set at {dir:?}: {why}")]
    Pins {
        /// The pin directory.
        dir: std::path::PathBuf,
        /// What was missing or refused.
        why: String,
    },
    /// The feed could not be mapped into this process.
    #[error("mapping the feed failed: {0}")]
    Map(#[source] std::io::Error),
    /// After setup, an munmap of a canary page produced no record: the
    /// programs do not see this process's calls, so the feed is refused.
    #[error("the canary munmap produced no record: the feed does not see this process")]
    Canary,
    /// This is a child forked after the feed was set up: the feed records
    /// the parent's calls, not this process's. Make a new `FeedMm` (and a
    /// new cache) in the child.
    #[error("forked child: the feed records the parent's calls, not this process's")]
    Forked,
    /// An io_uring `IORING_OP_MADVISE` that drops pages was submitted with
    /// `IOSQE_CQE_SKIP_SUCCESS`: the kernel posts no completion for it, so
    /// the feed cannot tell when its pages are gone, and no lookup through
    /// this address space can be trusted again. Submit such requests
    /// without the flag; a new `FeedMm` made after the request completed
    /// is exact again.
    #[error("an io_uring MADVISE was submitted with IOSQE_CQE_SKIP_SUCCESS: its end cannot be seen, so this feed can no longer be trusted")]
    Unpaired,
    /// The canary page could not be mapped or unmapped.
    #[error("the canary mapping failed: {0}")]
    CanaryMap(#[source] std::io::Error),
}
