//! Real mappings, raw system calls and the skip rule of the feed's tests.
#![allow(dead_code)]

use std::sync::Arc;

use mmfeed::{Feed, FeedError, FeedMm, Kind, Record};

pub const P: u64 = 4096;

/// Why the feed cannot be attached here, if that is a refusal of the
/// machine (no privileges), not a failure of ours. As root (CI) nothing is
/// excused: the tests must run there.
fn refused(e: &FeedError) -> bool {
    let root = rustix::process::geteuid().is_root();
    !root && matches!(e, FeedError::Load(_) | FeedError::Attach { .. })
}

/// `made`, or `None` (the reason printed) where the machine refuses BPF:
/// the only case in which these tests skip.
fn or_skip<T>(made: Result<T, FeedError>, what: &str) -> Option<T> {
    match made {
        Ok(v) => Some(v),
        Err(e) if refused(&e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// The process's feed, or `None` where the machine refuses BPF. Where the
/// test process was started with `MMFEED_ATTACH`, the feed's programs run
/// at the attach point it names.
pub fn feed() -> Option<Arc<Feed>> {
    let feed = or_skip(Feed::attach(), "Feed::attach")?;
    if let Ok(want) = std::env::var(mmfeed::ATTACH_ENV) {
        assert_eq!(
            feed.attach_point().name(),
            want,
            "the attach point asked for"
        );
    }
    Some(feed)
}

/// A `FeedMm`, or `None` where the machine refuses BPF.
pub fn feed_mm() -> Option<FeedMm> {
    or_skip(FeedMm::new(), "FeedMm::new")
}

pub fn gettid() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get() as u32
}

/// The records this thread's calls in `f` published, read right after `f`
/// returned (so: published before the calls returned).
pub fn records_during(feed: &Feed, f: impl FnOnce()) -> Vec<Kind> {
    let tid = gettid();
    let from = feed.head();
    f();
    let to = feed.head();
    (from..to)
        .filter_map(|i| feed.record(i))
        .filter(|r: &Record| r.tid == tid)
        .map(|r| r.kind)
        .collect()
}

/// Maps `pages` anonymous pages (read-write) with extra `flags`, at
/// `hint` if that range is free, else wherever the kernel chooses.
fn map_anonymous(hint: u64, pages: u64, flags: libc::c_int) -> u64 {
    assert_eq!(
        flags & libc::MAP_FIXED,
        0,
        "the helpers never replace a mapping"
    );
    // SAFETY: a new anonymous mapping without MAP_FIXED: a hint the kernel
    // cannot honour is ignored, so nothing already mapped is replaced.
    let p = unsafe {
        libc::mmap(
            hint as *mut _,
            (pages * P) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p as u64
}

/// Maps `pages` anonymous pages (read-write) with extra `flags`.
pub fn map_flags(pages: u64, flags: libc::c_int) -> u64 {
    map_anonymous(0, pages, flags)
}

/// Maps one anonymous page at `hint` if that address is free (no
/// `MAP_FIXED`: nothing is replaced), else wherever the kernel chooses.
pub fn map_at(hint: u64) -> u64 {
    map_anonymous(hint, 1, libc::MAP_PRIVATE)
}

pub fn map(pages: u64) -> u64 {
    map_flags(pages, libc::MAP_PRIVATE)
}

/// The raw munmap system call (not libc's wrapper).
pub fn raw_munmap(addr: u64, len: u64) -> i64 {
    // SAFETY: the tests unmap only mappings they made, with no reference
    // into them alive.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) }
}

/// Writes `tag` into the first word of the page at `addr`.
pub fn write_tag(addr: u64, tag: u64) {
    // SAFETY: `addr` is a page this test mapped read-write and still maps.
    unsafe { std::ptr::write_volatile(addr as *mut u64, tag) }
}

/// Reads the first word at `addr` through process_vm_readv: an error, not
/// a fault, where nothing is mapped (what a device pinning the page sees).
pub fn read_tag(addr: u64) -> Option<u64> {
    let mut v = 0u64;
    let local = libc::iovec {
        iov_base: (&mut v as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: 8,
    };
    // SAFETY: `local` is our own 8-byte buffer; the remote side is read by
    // the kernel, which reports an unmapped address as an error.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == 8).then_some(v)
}

/// A START covering exactly `[start, end)` for `Unmap`.
pub fn unmap_start(start: u64, end: u64) -> Kind {
    Kind::Start {
        start,
        end,
        event: mmu_notifier::Event::Unmap,
    }
}

/// Submits one MADVISE of `[addr, addr + len)` with `flags`, then a NOP,
/// and waits for the NOP's completion (a ring completes in order here: the
/// madvise's worker is done when its completion, if any, is posted; the NOP
/// makes a skipped one's submission certain).
pub fn uring_madvise(
    addr: u64,
    len: u64,
    advice: i32,
    flags: io_uring::squeue::Flags,
) -> Vec<(u64, i32)> {
    let mut ring = io_uring::IoUring::new(8).expect("io_uring_setup");
    let madvise = io_uring::opcode::Madvise::new(addr as *const libc::c_void, len as _, advice)
        .build()
        .flags(flags)
        .user_data(1);
    // SAFETY: the madvise names the test's own mapping, which no reference
    // observes; nothing else is referenced by the entry.
    unsafe { ring.submission().push(&madvise).expect("room for one") };
    ring.submit().expect("submit");
    let mut got = Vec::new();
    // The madvise's completion (when it posts one) comes from its worker.
    if !flags.contains(io_uring::squeue::Flags::SKIP_SUCCESS) {
        ring.submit_and_wait(1).expect("wait");
        got.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    }
    let nop = io_uring::opcode::Nop::new().build().user_data(2);
    // SAFETY: a NOP references nothing.
    unsafe { ring.submission().push(&nop).expect("room for one") };
    ring.submit_and_wait(1).expect("wait");
    got.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    got
}

/// The race tests' device: registers a page by reading the tag its mapper
/// wrote into it (through process_vm_readv, so an unmapped page is an
/// error, as a pin would be); a registration's handle is the tag of the
/// memory it holds.
pub struct TagDevice;

impl regcache::Registrar for TagDevice {
    type Handle = u64;
    fn register(
        &self,
        start: u64,
        _end: u64,
        _: regcache::Access,
    ) -> Result<u64, regcache::RegError> {
        match read_tag(start) {
            None => Err(regcache::RegError::other("the page is not mapped")),
            // Mapped, but its mapper has not tagged it yet: a registration
            // now would hold the right memory under a tag that is about to
            // change, which a race's check could not tell from a stale one.
            Some(0) => Err(regcache::RegError::other("the page is not tagged yet")),
            Some(tag) => Ok(tag),
        }
    }
    fn deregister(&self, _: u64) -> Result<(), regcache::RegError> {
        Ok(())
    }
    /// The tag again, so a lock-free hit can check it from the hit table's
    /// slot alone.
    fn hit_key(&self, tag: &u64) -> u64 {
        *tag
    }
}

/// A cache over `mm` registering with [`TagDevice`]; a registration raced
/// by the race tests may be retried many times.
pub fn tag_cache(mm: FeedMm) -> Arc<regcache::RegCache<FeedMm, TagDevice>> {
    Arc::new(regcache::RegCache::with_config(
        mm,
        TagDevice,
        regcache::Config {
            max_attempts: 1000,
            ..regcache::Config::default()
        },
    ))
}

/// How long each race runs: `MMFEED_RACE_SECONDS`, else 3 s.
pub fn seconds() -> std::time::Duration {
    let s = std::env::var("MMFEED_RACE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    std::time::Duration::from_secs_f64(s)
}
