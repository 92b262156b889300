//! Loading the shipped BPF object and attaching it: the programs of
//! `bpf/mmfeed.bpf.c` on the `syscalls:*` tracepoints, and this process's
//! feed registered under its tgid.

use std::os::fd::AsFd;
use std::path::Path;

use aya::maps::{Array, HashOfMaps, IterableMap, MapData};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};

use crate::error::FeedError;
use crate::ring::{Value, WORDS};
use crate::sys::SharedWords;

/// The object that ships, built from `bpf/mmfeed.bpf.c` by
/// `scripts/build-bpf.sh`.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/mmfeed.bpf.o");

/// `BPF_F_MMAPABLE`: the array's values can be mapped by user space.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Each program and the tracepoint (category, name) it runs on.
pub(crate) const PROGRAMS: [(&str, &str, &str); 20] = [
    ("enter_munmap", "syscalls", "sys_enter_munmap"),
    ("enter_mremap", "syscalls", "sys_enter_mremap"),
    ("enter_mmap", "syscalls", "sys_enter_mmap"),
    ("enter_madvise", "syscalls", "sys_enter_madvise"),
    ("enter_brk", "syscalls", "sys_enter_brk"),
    ("enter_shmdt", "syscalls", "sys_enter_shmdt"),
    ("enter_shmat", "syscalls", "sys_enter_shmat"),
    ("enter_io_destroy", "syscalls", "sys_enter_io_destroy"),
    (
        "enter_process_madvise",
        "syscalls",
        "sys_enter_process_madvise",
    ),
    ("exit_munmap", "syscalls", "sys_exit_munmap"),
    ("exit_mremap", "syscalls", "sys_exit_mremap"),
    ("exit_mmap", "syscalls", "sys_exit_mmap"),
    ("exit_madvise", "syscalls", "sys_exit_madvise"),
    ("exit_brk", "syscalls", "sys_exit_brk"),
    ("exit_shmdt", "syscalls", "sys_exit_shmdt"),
    ("exit_shmat", "syscalls", "sys_exit_shmat"),
    ("exit_io_destroy", "syscalls", "sys_exit_io_destroy"),
    (
        "exit_process_madvise",
        "syscalls",
        "sys_exit_process_madvise",
    ),
    // io_uring's MADVISE: queued for its worker (START), completed (END).
    ("uring_queue", "io_uring", "io_uring_queue_async_work"),
    ("uring_complete", "io_uring", "io_uring_complete"),
];

/// The key the programs file a process's feed under: its tgid (what
/// `getpid` returns, and what a peer credential carries).
pub(crate) fn tgid_of(pid: rustix::process::Pid) -> u32 {
    pid.as_raw_nonzero().get() as u32
}

/// This process's key ([`tgid_of`] of `getpid`).
pub(crate) fn this_tgid() -> u32 {
    tgid_of(rustix::process::getpid())
}

/// Where the programs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachPoint {
    /// The `syscalls:sys_enter_*` / `sys_exit_*` tracepoints. Enabling any
    /// of them makes every system call of every process on the host take
    /// the kernel's traced path (the host-wide tax the README states).
    SyscallTracepoints,
}

/// The program set, loaded and attached: what serves every process on the
/// host. Loaded by a process for itself, or once by the privileged helper
/// (`mmfeed-helper`) for all its clients.
pub struct Programs {
    /// Owns the programs and their links.
    _ebpf: Ebpf,
    feeds: HashOfMaps<MapData, u32>,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs").finish_non_exhaustive()
    }
}

/// One process's feed: the map the programs write for it.
pub struct FeedMap {
    map: Array<MapData, Value>,
    tgid: u32,
}

impl std::fmt::Debug for FeedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedMap").field("tgid", &self.tgid).finish()
    }
}

impl FeedMap {
    /// The map's descriptor (read-write: a read-only one cannot be mapped).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.map().fd().as_fd()
    }

    /// The process it serves.
    pub fn tgid(&self) -> u32 {
        self.tgid
    }
}

impl Programs {
    /// Loads the shipped object and attaches every program.
    ///
    /// # Errors
    /// [`FeedError::Load`] or [`FeedError::Attach`]: what the machine
    /// refused (privileges, BTF, tracefs).
    pub fn load() -> Result<Programs, FeedError> {
        ensure_tracefs();
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| FeedError::Load(chain(&e)))?;
        for (program, category, tracepoint) in PROGRAMS {
            let attach = |ebpf: &mut Ebpf| -> Result<(), String> {
                let p: &mut TracePoint = ebpf
                    .program_mut(program)
                    .ok_or("not in the object")?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                p.load().map_err(|e| e.to_string())?;
                p.attach(category, tracepoint).map_err(|e| e.to_string())?;
                Ok(())
            };
            attach(&mut ebpf).map_err(|why| FeedError::Attach {
                category,
                tracepoint,
                why,
            })?;
        }
        let feeds = ebpf
            .take_map("feeds")
            .ok_or_else(|| FeedError::Load("the object has no `feeds` map".into()))?;
        let feeds: HashOfMaps<MapData, u32> =
            HashOfMaps::try_from(feeds).map_err(|e| FeedError::Load(e.to_string()))?;
        Ok(Programs { _ebpf: ebpf, feeds })
    }

    /// Where the programs run.
    pub fn attach_point(&self) -> AttachPoint {
        AttachPoint::SyscallTracepoints
    }

    /// Creates a feed for process `tgid` and registers it: from now on the
    /// programs publish that process's calls into it (and only into it).
    ///
    /// # Errors
    /// [`FeedError::Load`] when the map cannot be created or registered.
    pub fn add_feed(&mut self, tgid: u32) -> Result<FeedMap, FeedError> {
        let map = Array::<MapData, Value>::create(1, BPF_F_MMAPABLE)
            .map_err(|e| FeedError::Load(format!("creating the feed map: {e}")))?;
        self.feeds
            .insert(tgid, map.map(), 0)
            .map_err(|e| FeedError::Load(format!("registering the feed: {e}")))?;
        Ok(FeedMap { map, tgid })
    }

    /// Unregisters the feed filed under `feed.tgid()`.
    pub fn remove_feed(&mut self, feed: &FeedMap) {
        let _ = self.feeds.remove(&feed.tgid);
    }
}

/// The programs this process loaded and its feed, registered under its
/// tgid; dropping it unregisters the feed and detaches the programs.
pub(crate) struct Loaded {
    programs: Programs,
    feed: FeedMap,
}

impl Loaded {
    /// Loads the programs for this process alone and registers its feed;
    /// returns the feed's mapping too.
    pub(crate) fn load() -> Result<(Loaded, SharedWords), FeedError> {
        let mut programs = Programs::load()?;
        let feed = programs.add_feed(this_tgid())?;
        let words = SharedWords::map(feed.fd(), WORDS).map_err(FeedError::Map)?;
        Ok((Loaded { programs, feed }, words))
    }

    /// Where the programs run.
    pub(crate) fn attach_point(&self) -> AttachPoint {
        self.programs.attach_point()
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // A forked child dropping its copy must not unregister the parent's
        // feed (the key is the parent's tgid).
        if this_tgid() == self.feed.tgid {
            self.programs.remove_feed(&self.feed);
        }
    }
}

/// aya attaches tracepoints through tracefs; mount it where the machine has
/// not (it needs the same privileges as loading, so a failure here shows as
/// the attach error).
fn ensure_tracefs() {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    let _ = rustix::mount::mount(
        "tracefs",
        tracing,
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    );
}

/// An error and its sources, on one line (aya's errors nest the reason).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
