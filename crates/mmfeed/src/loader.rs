//! Loading the shipped BPF object and attaching it: the programs of
//! `bpf/mmfeed.bpf.c` on the `syscalls:*` and `io_uring:*` tracepoints, and
//! this process's feed registered under its tgid. Or, where another
//! privileged process pinned a loaded set in bpffs, reusing that set.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashOfMaps, IterableMap, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::trace_point::TracePointLinkId;
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};

use crate::error::FeedError;
use crate::ring::{Value, WORDS};
use crate::sys::SharedWords;

/// The object that ships, built from `bpf/mmfeed.bpf.c` by
/// `scripts/build-bpf.sh`.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/mmfeed.bpf.o");

/// `BPF_F_MMAPABLE`: the array's values can be mapped by user space.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Where a program of the object runs.
#[derive(Clone, Copy, Debug)]
enum Hook {
    /// A tracepoint: category and name.
    Tracepoint(&'static str, &'static str),
    /// A BTF raw tracepoint (`tp_btf`): its name.
    BtfRaw(&'static str),
}

/// A program of the object and where it runs.
type Program = (&'static str, Hook);

/// The calls' programs on the `syscalls:*` tracepoints: one for the entry
/// and one for the exit of each call.
const SYSCALL_PROGRAMS: [Program; 18] = {
    use Hook::Tracepoint as T;
    [
        ("enter_munmap", T("syscalls", "sys_enter_munmap")),
        ("enter_mremap", T("syscalls", "sys_enter_mremap")),
        ("enter_mmap", T("syscalls", "sys_enter_mmap")),
        ("enter_madvise", T("syscalls", "sys_enter_madvise")),
        ("enter_brk", T("syscalls", "sys_enter_brk")),
        ("enter_shmdt", T("syscalls", "sys_enter_shmdt")),
        ("enter_shmat", T("syscalls", "sys_enter_shmat")),
        ("enter_io_destroy", T("syscalls", "sys_enter_io_destroy")),
        (
            "enter_process_madvise",
            T("syscalls", "sys_enter_process_madvise"),
        ),
        ("exit_munmap", T("syscalls", "sys_exit_munmap")),
        ("exit_mremap", T("syscalls", "sys_exit_mremap")),
        ("exit_mmap", T("syscalls", "sys_exit_mmap")),
        ("exit_madvise", T("syscalls", "sys_exit_madvise")),
        ("exit_brk", T("syscalls", "sys_exit_brk")),
        ("exit_shmdt", T("syscalls", "sys_exit_shmdt")),
        ("exit_shmat", T("syscalls", "sys_exit_shmat")),
        ("exit_io_destroy", T("syscalls", "sys_exit_io_destroy")),
        (
            "exit_process_madvise",
            T("syscalls", "sys_exit_process_madvise"),
        ),
    ]
};

/// The same calls from the BTF raw tracepoints of every system call's entry
/// and exit (picked by number in the programs; x86-64 only).
const BTF_PROGRAMS: [Program; 2] = [
    ("btf_sys_enter", Hook::BtfRaw("sys_enter")),
    ("btf_sys_exit", Hook::BtfRaw("sys_exit")),
];

/// io_uring's MADVISE: queued for its worker (START), completed (END).
/// Attached with either set.
const URING_PROGRAMS: [Program; 2] = [
    (
        "uring_queue",
        Hook::Tracepoint("io_uring", "io_uring_queue_async_work"),
    ),
    (
        "uring_complete",
        Hook::Tracepoint("io_uring", "io_uring_complete"),
    ),
];

/// The programs attached at `point`.
fn programs_at(point: AttachPoint) -> impl Iterator<Item = Program> {
    let calls: &'static [Program] = match point {
        AttachPoint::SyscallTracepoints => &SYSCALL_PROGRAMS,
        AttachPoint::BtfRawTracepoints => &BTF_PROGRAMS,
    };
    calls.iter().chain(URING_PROGRAMS.iter()).copied()
}

/// Every program name that can be pinned (for [`Programs::unpin`]).
fn every_program() -> impl Iterator<Item = &'static str> {
    SYSCALL_PROGRAMS
        .iter()
        .chain(BTF_PROGRAMS.iter())
        .chain(URING_PROGRAMS.iter())
        .map(|p| p.0)
}

/// A program's link, while the program set owns it.
#[derive(Debug)]
enum LinkId {
    Tracepoint(TracePointLinkId),
    BtfRaw(BtfTracePointLinkId),
}

/// The environment variable that chooses the attach point instead of the
/// probing: `tracepoints` or `tp_btf`.
pub const ATTACH_ENV: &str = "MMFEED_ATTACH";

/// Where a pinned program set lives unless the environment variable
/// `MMFEED_PIN_DIR` names another directory (in a bpffs mount).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mmfeed";

/// The pin directory processes look in: `MMFEED_PIN_DIR`, else
/// [`DEFAULT_PIN_DIR`].
pub fn pin_dir() -> PathBuf {
    std::env::var_os("MMFEED_PIN_DIR")
        .map(Into::into)
        .unwrap_or_else(|| DEFAULT_PIN_DIR.into())
}

/// The name of the pinned `feeds` map in a pin directory (each program's
/// link is pinned under the program's name).
const FEEDS_PIN: &str = "feeds";

/// The key the programs file a process's feed under: its tgid (what
/// `getpid` returns, and what a peer credential carries).
pub(crate) fn tgid_of(pid: rustix::process::Pid) -> u32 {
    pid.as_raw_nonzero().get() as u32
}

/// This process's key ([`tgid_of`] of `getpid`).
pub(crate) fn this_tgid() -> u32 {
    tgid_of(rustix::process::getpid())
}

/// Where the programs run. [`Programs::load`] tries them in this order
/// (fentry, which would spare the calls the feed ignores, is not among
/// them: see the crate docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachPoint {
    /// The `syscalls:sys_enter_*` / `sys_exit_*` tracepoints, one program
    /// per call. Enabling any of them makes every system call of every
    /// process on the host take the kernel's traced path (the host-wide tax
    /// the README states).
    SyscallTracepoints,
    /// The BTF raw tracepoints `sys_enter` / `sys_exit` (`tp_btf`), for
    /// kernels without the `syscalls:*` tracepoints: one program sees every
    /// system call of the host and picks the fed ones by number, which
    /// costs every call more than the tracepoints do. x86-64 only.
    BtfRawTracepoints,
}

impl AttachPoint {
    /// The name [`ATTACH_ENV`] takes for it.
    pub fn name(self) -> &'static str {
        match self {
            AttachPoint::SyscallTracepoints => "tracepoints",
            AttachPoint::BtfRawTracepoints => "tp_btf",
        }
    }
}

/// The attach point [`ATTACH_ENV`] asks for, if it is set.
fn attach_choice() -> Result<Option<AttachPoint>, FeedError> {
    let Some(v) = std::env::var_os(ATTACH_ENV) else {
        return Ok(None);
    };
    [
        AttachPoint::SyscallTracepoints,
        AttachPoint::BtfRawTracepoints,
    ]
    .into_iter()
    .find(|p| v == p.name())
    .map(Some)
    .ok_or_else(|| FeedError::BadAttachPoint(v.to_string_lossy().into_owned()))
}

/// The program set, loaded and attached: what serves every process on the
/// host. Loaded by a process for itself, or once by the privileged helper
/// (`mmfeed-helper`) for all its clients, or pinned in bpffs by a privileged
/// process ([`pin`](Self::pin)) and reused by others
/// ([`from_pins`](Self::from_pins)).
pub struct Programs {
    /// Owns the programs and their links (none when reused from pins: the
    /// pinned links keep the programs attached).
    ebpf: Option<Ebpf>,
    /// Each program's link, to pin.
    links: Vec<(&'static str, LinkId)>,
    feeds: HashOfMaps<MapData, u32>,
    point: AttachPoint,
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
    /// Loads the shipped object and attaches its programs at the first
    /// attach point the kernel allows: the `syscalls:*` tracepoints, else
    /// the BTF raw tracepoints (or the one [`ATTACH_ENV`] names).
    ///
    /// # Errors
    /// [`FeedError::Load`] or [`FeedError::Attach`]: what the machine
    /// refused (privileges, BTF, tracefs).
    pub fn load() -> Result<Programs, FeedError> {
        if let Some(point) = attach_choice()? {
            return Self::load_at(point);
        }
        match Self::load_at(AttachPoint::SyscallTracepoints) {
            // A tracepoint the kernel does not have: try the next point.
            Err(first @ FeedError::Attach { .. }) => Self::load_at(AttachPoint::BtfRawTracepoints)
                .map_err(|then| FeedError::Load(format!("{first}; then, with tp_btf: {then}"))),
            other => other,
        }
    }

    /// Loads the shipped object and attaches its programs at `point`.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_at(point: AttachPoint) -> Result<Programs, FeedError> {
        ensure_tracefs();
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| FeedError::Load(chain(&e)))?;
        let mut btf = None;
        let mut links = Vec::new();
        for (program, hook) in programs_at(point) {
            let link = attach(&mut ebpf, program, hook, &mut btf).map_err(|why| {
                let (category, tracepoint) = match hook {
                    Hook::Tracepoint(c, t) => (c, t),
                    Hook::BtfRaw(t) => ("tp_btf", t),
                };
                FeedError::Attach {
                    category,
                    tracepoint,
                    why,
                }
            })?;
            links.push((program, link));
        }
        let feeds = ebpf
            .take_map("feeds")
            .ok_or_else(|| FeedError::Load("the object has no `feeds` map".into()))?;
        let feeds: HashOfMaps<MapData, u32> =
            HashOfMaps::try_from(feeds).map_err(|e| FeedError::Load(e.to_string()))?;
        Ok(Programs {
            ebpf: Some(ebpf),
            links,
            feeds,
            point,
        })
    }

    /// Pins this loaded set in `dir` (a bpffs directory, made if missing;
    /// bpffs is mounted at `/sys/fs/bpf` first where it is not): each
    /// program's link and the `feeds` map. The programs then stay attached
    /// with no process holding them, and any process allowed to open `dir`
    /// can reuse them ([`from_pins`](Self::from_pins)) instead of loading a
    /// set of its own (each set taxes every system call again). Remove them
    /// with [`unpin`](Self::unpin).
    ///
    /// # Errors
    /// [`FeedError::Pins`]: bpffs cannot be mounted or written, or this set
    /// was itself reused from pins. Whatever was pinned is removed again.
    pub fn pin(mut self, dir: &Path) -> Result<(), FeedError> {
        let fail = |why: String| FeedError::Pins {
            dir: dir.to_path_buf(),
            why,
        };
        let Some(mut ebpf) = self.ebpf.take() else {
            return Err(fail("this set is reused from pins already".into()));
        };
        ensure_bpffs();
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("making the directory: {e}")))?;
        if let Err(why) = pin_set(&mut ebpf, self.links, self.feeds, dir) {
            let _ = Self::unpin(dir);
            return Err(fail(why));
        }
        Ok(())
    }

    /// The set another process pinned in `dir` ([`pin`](Self::pin)): its
    /// `feeds` map, with every program's link checked to be there. Adding a
    /// feed to it still needs CAP_BPF (a map is created); loading,
    /// attaching and the tracefs are not needed.
    ///
    /// # Errors
    /// [`FeedError::Pins`]: `dir` does not hold a complete set, or it
    /// cannot be opened.
    pub fn from_pins(dir: &Path) -> Result<Programs, FeedError> {
        let fail = |why: String| FeedError::Pins {
            dir: dir.to_path_buf(),
            why,
        };
        let point = if dir.join(BTF_PROGRAMS[0].0).exists() {
            AttachPoint::BtfRawTracepoints
        } else {
            AttachPoint::SyscallTracepoints
        };
        for (program, _) in programs_at(point) {
            PinnedLink::from_pin(dir.join(program))
                .map_err(|e| fail(format!("the link of {program}: {}", chain(&e))))?;
        }
        let feeds = MapData::from_pin(dir.join(FEEDS_PIN))
            .map_err(|e| fail(format!("the feeds map: {}", chain(&e))))?;
        let feeds = HashOfMaps::try_from(Map::HashOfMaps(feeds))
            .map_err(|e| fail(format!("the feeds map: {e}")))?;
        Ok(Programs {
            ebpf: None,
            links: Vec::new(),
            feeds,
            point,
        })
    }

    /// Removes a pinned set from `dir` (the links' pins, the map's, and the
    /// directory): the programs detach once no process holds them.
    ///
    /// # Errors
    /// The first pin that exists and could not be removed.
    pub fn unpin(dir: &Path) -> std::io::Result<()> {
        let names = every_program().chain([FEEDS_PIN]);
        let mut first = Ok(());
        for name in names {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound && first.is_ok() => {
                    first = Err(e)
                }
                _ => {}
            }
        }
        let _ = std::fs::remove_dir(dir);
        first
    }

    /// Where the programs run.
    pub fn attach_point(&self) -> AttachPoint {
        self.point
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
        Self::with(Programs::load()?)
    }

    /// Registers this process's feed with the set pinned in `dir`.
    pub(crate) fn from_pins(dir: &Path) -> Result<(Loaded, SharedWords), FeedError> {
        Self::with(Programs::from_pins(dir)?)
    }

    fn with(mut programs: Programs) -> Result<(Loaded, SharedWords), FeedError> {
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

/// Loads program `name` and attaches it at `hook`; the kernel's BTF is read
/// once, for the first `tp_btf` program.
fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    hook: Hook,
    btf: &mut Option<Btf>,
) -> Result<LinkId, String> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("{name} is not in the object"))?;
    match hook {
        Hook::Tracepoint(category, tracepoint) => {
            let p: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            p.load().map_err(|e| chain(&e))?;
            Ok(LinkId::Tracepoint(
                p.attach(category, tracepoint).map_err(|e| chain(&e))?,
            ))
        }
        Hook::BtfRaw(tracepoint) => {
            if btf.is_none() {
                *btf = Some(Btf::from_sys_fs().map_err(|e| format!("the kernel's BTF: {e}"))?);
            }
            let btf = btf.as_ref().expect("read above");
            let p: &mut BtfTracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            p.load(tracepoint, btf).map_err(|e| chain(&e))?;
            Ok(LinkId::BtfRaw(p.attach().map_err(|e| chain(&e))?))
        }
    }
}

/// Pins each program's link and the `feeds` map in `dir`.
fn pin_set(
    ebpf: &mut Ebpf,
    links: Vec<(&'static str, LinkId)>,
    feeds: HashOfMaps<MapData, u32>,
    dir: &Path,
) -> Result<(), String> {
    for (program, link) in links {
        let p = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("{program} is not in the object"))?;
        let link = match link {
            LinkId::Tracepoint(id) => {
                let p: &mut TracePoint = p.try_into().map_err(|e| format!("{e}"))?;
                let link = p.take_link(id).map_err(|e| e.to_string())?;
                FdLink::try_from(link).map_err(|e| {
                    format!("{program}: the kernel attached it without a BPF link ({e})")
                })?
            }
            LinkId::BtfRaw(id) => {
                let p: &mut BtfTracePoint = p.try_into().map_err(|e| format!("{e}"))?;
                FdLink::from(p.take_link(id).map_err(|e| e.to_string())?)
            }
        };
        link.pin(dir.join(program))
            .map_err(|e| format!("{program}: {}", chain(&e)))?;
    }
    feeds
        .pin(dir.join(FEEDS_PIN))
        .map_err(|e| format!("feeds: {}", chain(&e)))
}

/// Pins live in bpffs; mount it at `/sys/fs/bpf` where the machine has not
/// (a failure shows as the pin error).
fn ensure_bpffs() {
    let fs = Path::new("/sys/fs/bpf");
    if rustix::fs::statfs(fs).is_ok_and(|s| s.f_type as u64 == 0xcafe_4a11) {
        return;
    }
    let _ = rustix::mount::mount("bpf", fs, "bpf", rustix::mount::MountFlags::empty(), None);
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
