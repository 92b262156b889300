//! The crate's only `unsafe`: mappings seen as atomic words.
//!
//! * The feed: the kernel's BPF programs write it (a `BPF_F_MMAPABLE`
//!   array map); this process maps it read-only and reads every word
//!   through an atomic load. Nothing here interprets the words: that is
//!   `ring`'s job.
//! * The fork sentinel: one private `MADV_WIPEONFORK` page holding a
//!   nonzero word, which a forked child sees as zero (one load, where
//!   `getpid` would be a system call per lookup).

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

/// A mapping seen as 64-bit atomic words: a BPF array map's values
/// (read-only, shared), or a private wipe-on-fork page.
pub(crate) struct SharedWords {
    ptr: NonNull<AtomicU64>,
    words: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only ever accessed through
// atomics (`words`); sharing or moving it between threads is what
// `&[AtomicU64]` allows.
unsafe impl Send for SharedWords {}
// SAFETY: as for Send: `words` hands out `&[AtomicU64]`, which is Sync.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps the first `words` 64-bit words of the values of the array map
    /// `fd` (created with `BPF_F_MMAPABLE`; offset 0 is its first value).
    pub(crate) fn map(fd: BorrowedFd<'_>, words: usize) -> std::io::Result<SharedWords> {
        let page = rustix::param::page_size();
        let bytes = (words * 8).div_ceil(page) * page;
        // SAFETY: a new shared mapping chosen by the kernel (no address hint,
        // no MAP_FIXED), so no existing memory of this process is replaced;
        // the kernel checks that `fd` is a mappable map of at least `bytes`.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                bytes,
                ProtFlags::READ,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<AtomicU64>()).ok_or(std::io::ErrorKind::Other)?;
        Ok(SharedWords { ptr, words, bytes })
    }

    /// The mapped words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is a live mapping of `bytes >= words * 8` readable
        // bytes, page-aligned (so aligned for AtomicU64, which has u64's
        // layout), unmapped only by Drop, so it outlives the borrow. The
        // BPF programs change a feed's words concurrently; every access
        // from this side is atomic (loads only on the read-only feed: an
        // AtomicU64 load of an aligned word never writes), so there is no
        // data race in Rust's sense and no `&u64` assumes the value fixed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl SharedWords {
    /// One private page with `MADV_WIPEONFORK`, its first word set to 1: a
    /// child forked later sees 0 there.
    pub(crate) fn fork_sentinel() -> std::io::Result<SharedWords> {
        use rustix::mm::{madvise, mmap_anonymous, Advice};
        let bytes = rustix::param::page_size();
        // SAFETY: a new private mapping chosen by the kernel (no address
        // hint, no MAP_FIXED): nothing of this process is replaced.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                bytes,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        let ptr = NonNull::new(p.cast::<AtomicU64>()).ok_or(std::io::ErrorKind::Other)?;
        // From here `Drop` unmaps it, whatever fails next.
        let page = SharedWords {
            ptr,
            words: 1,
            bytes,
        };
        // SAFETY: advice on the page mapped above, which nothing else uses.
        unsafe { madvise(p, bytes, Advice::LinuxWipeOnFork) }?;
        page.words()[0].store(1, std::sync::atomic::Ordering::Relaxed);
        Ok(page)
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `bytes` bytes; no borrow of
        // `words` outlives `self`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Maps a fresh anonymous page and unmaps it again; returns its address.
pub(crate) fn canary_munmap(page: usize) -> std::io::Result<u64> {
    use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
    // SAFETY: a new private mapping chosen by the kernel (no address hint,
    // no MAP_FIXED): no existing memory of this process is replaced.
    let p = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            page,
            ProtFlags::READ,
            MapFlags::PRIVATE,
        )
    }?;
    // SAFETY: the page mapped just above, never handed out.
    unsafe { munmap(p, page) }?;
    Ok(p as u64)
}
