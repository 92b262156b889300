//! Real mappings for the tests, and the skip rule.
#![allow(dead_code)]

use rustix::mm::{MapFlags, ProtFlags};
use uffd::{ProcessMm, UffdError};

pub const P: u64 = 4096;

/// Serializes the tests of one binary: two `ProcessMm`s in one process
/// each have a userfaultfd, and registering whole mappings with both (a
/// fresh mapping can merge with another test's) fails with EBUSY. One
/// `ProcessMm` per process is the intended deployment.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `ProcessMm`, or `None` (with the reason printed) where userfaultfd is
/// unavailable: the only case in which these tests skip.
pub fn process_mm() -> Option<ProcessMm> {
    process_mm_with(uffd::FlushScope::default())
}

/// As [`process_mm`], with the given flush scope.
pub fn process_mm_with(scope: uffd::FlushScope) -> Option<ProcessMm> {
    match ProcessMm::with_scope(scope) {
        Ok(mm) => Some(mm),
        Err(e @ UffdError::Unavailable { .. }) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("ProcessMm::new: {e}"),
    }
}

/// Maps `pages` anonymous private pages (read-write).
pub fn map(pages: u64) -> u64 {
    map_with(pages, MapFlags::PRIVATE)
}

pub fn map_with(pages: u64, flags: MapFlags) -> u64 {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's
    // choosing replaces nothing.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            (pages * P) as usize,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
        )
    }
    .expect("mmap");
    p as u64
}

/// Maps anonymous pages at exactly `addr` (MAP_FIXED over what is there).
pub fn map_fixed(addr: u64, pages: u64) {
    // SAFETY: the tests only map over ranges they mapped themselves and no
    // reference into them is alive.
    unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut _,
            (pages * P) as usize,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
        )
    }
    .expect("mmap fixed");
}

pub fn unmap(addr: u64, pages: u64) {
    // SAFETY: the tests unmap only their own mappings, with no reference
    // into them alive.
    unsafe { rustix::mm::munmap(addr as *mut _, (pages * P) as usize) }.expect("munmap");
}

pub fn advise(addr: u64, pages: u64, advice: rustix::mm::Advice) {
    // SAFETY: DONTNEED/FREE on the tests' own anonymous mappings only drops
    // their contents, which no reference observes.
    unsafe { rustix::mm::madvise(addr as *mut _, (pages * P) as usize, advice) }.expect("madvise");
}

/// mremap; returns the new address.
pub fn remap(
    addr: u64,
    pages: u64,
    new_pages: u64,
    may_move: bool,
) -> Result<u64, rustix::io::Errno> {
    let flags = if may_move {
        rustix::mm::MremapFlags::MAYMOVE
    } else {
        rustix::mm::MremapFlags::empty()
    };
    // SAFETY: remapping the tests' own mappings, with no reference into
    // them alive.
    unsafe {
        rustix::mm::mremap(
            addr as *mut _,
            (pages * P) as usize,
            (new_pages * P) as usize,
            flags,
        )
    }
    .map(|p| p as u64)
}

pub fn write_word(addr: u64, v: u64) {
    // SAFETY: `addr` is inside a live read-write mapping the test owns,
    // 8-byte aligned; volatile because other threads remap it.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
}

pub fn read_word(addr: u64) -> u64 {
    // SAFETY: as `write_word`.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// xorshift64: the pseudo-random sequence of the race test and the
/// benchmarks (and of benches/c/harness.c).
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A registration cache on `mm` holding at most `max_cached` registrations,
/// with no device ([`uffd::Populate`] faults the pages in).
#[allow(dead_code)]
pub fn cache(mm: &ProcessMm, max_cached: usize) -> regcache::RegCache<ProcessMm, uffd::Populate> {
    regcache::RegCache::with_config(
        mm.clone(),
        uffd::Populate,
        regcache::Config {
            max_cached,
            ..regcache::Config::default()
        },
    )
}
