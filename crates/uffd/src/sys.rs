//! The syscall layer: every `unsafe` of this crate is here.
//!
//! * [`Uffd`]: a userfaultfd in write-protect mode with the UNMAP, REMOVE and
//!   REMAP events; register/unregister ranges, read events without blocking.
//! * [`ForkSentinel`]: one `MADV_WIPEONFORK` page, so "are we a forked
//!   child?" is one load instead of a `getpid` syscall on every lookup.
//! * [`populate`]: `MADV_POPULATE_READ/WRITE`, the user-space equivalent of
//!   the page walk a registration (`ibv_reg_mr`) makes.
//!
//! Why write-protect mode: a MISSING-mode registration turns every first
//! touch of a registered page into a round trip through the monitor (and a
//! hang if the monitor does not resolve it). Events are delivered for any
//! registered VMA whatever the mode, and a WP registration only faults on
//! PTEs someone write-protected with `UFFDIO_WRITEPROTECT`, which this crate
//! never does: the application never waits for the monitor except in the
//! munmap/mremap/madvise calls the events come from. For the same reason the
//! descriptor can be `UFFD_USER_MODE_ONLY`, which unprivileged processes may
//! open even with `vm.unprivileged_userfaultfd = 0`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use linux_raw_sys::general as uapi;
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Updater};
use rustix::mm::{Advice, MapFlags, ProtFlags, UserfaultfdFlags};

use crate::error::UffdError;

/// The events we ask for.
pub(crate) const FEATURES: u64 = (uapi::UFFD_FEATURE_EVENT_UNMAP
    | uapi::UFFD_FEATURE_EVENT_REMOVE
    | uapi::UFFD_FEATURE_EVENT_REMAP
    | uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP) as u64;

/// One userfaultfd message (`struct uffd_msg`, 32 bytes).
pub(crate) type Msg = uapi::uffd_msg;

/// What one message says, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// `UFFD_EVENT_UNMAP`: `[start, end)` is being unmapped.
    Unmap { start: u64, end: u64 },
    /// `UFFD_EVENT_REMOVE`: madvise DONTNEED/FREE/REMOVE over `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `UFFD_EVENT_REMAP`: mremap moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// A page fault on a registered range (not expected in WP mode).
    PageFault { address: u64 },
    /// Anything else (FORK is not requested).
    Other(u8),
}

impl Message {
    pub(crate) fn decode(m: &Msg) -> Message {
        // SAFETY: the kernel fills the union member matching `event`; every
        // member is plain integers, so reading any of them is defined, and
        // we read only the one `event` names.
        unsafe {
            match u32::from(m.event) {
                uapi::UFFD_EVENT_UNMAP => Message::Unmap {
                    start: m.arg.remove.start,
                    end: m.arg.remove.end,
                },
                uapi::UFFD_EVENT_REMOVE => Message::Remove {
                    start: m.arg.remove.start,
                    end: m.arg.remove.end,
                },
                uapi::UFFD_EVENT_REMAP => Message::Remap {
                    from: m.arg.remap.from,
                    to: m.arg.remap.to,
                    len: m.arg.remap.len,
                },
                uapi::UFFD_EVENT_PAGEFAULT => Message::PageFault {
                    address: m.arg.pagefault.address,
                },
                e => Message::Other(e as u8),
            }
        }
    }
}

/// A userfaultfd with the event features enabled.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

fn zeroed_msgs<const N: usize>() -> [Msg; N] {
    // SAFETY: `uffd_msg` is plain integers and unions of them: all-zero is a
    // valid value.
    [(); N].map(|()| unsafe { std::mem::zeroed() })
}

/// A batch of messages for [`Uffd::read`].
pub(crate) struct MsgBuf {
    msgs: [Msg; 64],
}

impl MsgBuf {
    pub(crate) fn new() -> Self {
        MsgBuf {
            msgs: zeroed_msgs(),
        }
    }
}

impl Uffd {
    /// Opens a userfaultfd (the syscall with `UFFD_USER_MODE_ONLY`, then
    /// `/dev/userfaultfd`) and enables the event features.
    pub(crate) fn open() -> Result<Uffd, UffdError> {
        let flags = UserfaultfdFlags::CLOEXEC
            | UserfaultfdFlags::NONBLOCK
            | UserfaultfdFlags::from_bits_retain(uapi::UFFD_USER_MODE_ONLY);
        // SAFETY: userfaultfd(2) returns a new descriptor we own; the unsafe
        // marker is about the process's memory being handled through it,
        // and this crate never resolves faults, it only reads events.
        let fd = match unsafe { rustix::mm::userfaultfd(flags) } {
            Ok(fd) => fd,
            Err(syscall) => {
                Self::open_dev().map_err(|dev| UffdError::Unavailable { syscall, dev })?
            }
        };
        let uffd = Uffd { fd };
        uffd.api()?;
        Ok(uffd)
    }

    fn open_dev() -> Result<OwnedFd, Errno> {
        use rustix::fs::{open, Mode, OFlags};
        let dev = open(
            "/dev/userfaultfd",
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let flags = uapi::O_CLOEXEC | uapi::O_NONBLOCK | uapi::UFFD_USER_MODE_ONLY;
        // SAFETY: see `NewUffd`.
        unsafe { ioctl(&dev, NewUffd(flags as usize)) }
    }

    fn api(&self) -> Result<(), UffdError> {
        let mut api = uapi::uffdio_api {
            api: uapi::UFFD_API as u64,
            features: FEATURES,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly a `uffdio_api`.
        unsafe {
            ioctl(
                &self.fd,
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_API }, _>::new(&mut api),
            )
        }
        .map_err(UffdError::Api)?;
        Ok(())
    }

    /// Registers `[start, start + len)` in write-protect mode.
    pub(crate) fn register(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range { start, len },
            mode: uapi::UFFDIO_REGISTER_MODE_WP as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a `uffdio_register`.
        unsafe {
            ioctl(
                &self.fd,
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_REGISTER }, _>::new(&mut reg),
            )
        }
        .map(|_| ())
    }

    /// Unregisters `[start, start + len)`.
    pub(crate) fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut range = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads exactly a `uffdio_range` (declared
        // _IOR; the pointer is only read).
        unsafe {
            ioctl(
                &self.fd,
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_UNREGISTER }, _>::new(&mut range),
            )
        }
        .map(|_| ())
    }

    /// Wakes threads waiting on a fault in `[start, start + len)`.
    pub(crate) fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut range = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads exactly a `uffdio_range`.
        unsafe {
            ioctl(
                &self.fd,
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_WAKE }, _>::new(&mut range),
            )
        }
        .map(|_| ())
    }

    /// Whether the kernel holds layout changes of registered ranges whose
    /// events the monitor has not read yet (the context's `mmap_changing`
    /// count, raised when a munmap, mremap or madvise of a registered range
    /// starts and dropped when its event is read). `UFFDIO_ZEROPAGE` tests it
    /// before anything else and fails with `EAGAIN`; otherwise it fails on
    /// the empty range passed here (`EINVAL`) without touching memory.
    pub(crate) fn changes_pending(&self) -> bool {
        let mut z = uapi::uffdio_zeropage {
            range: uapi::uffdio_range { start: 0, len: 0 },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads a `uffdio_zeropage` and writes its
        // `zeropage` field; `z` is exactly that struct and outlives the call.
        let r = unsafe {
            ioctl(
                &self.fd,
                Updater::<{ linux_raw_sys::ioctl::UFFDIO_ZEROPAGE }, _>::new(&mut z),
            )
        };
        r == Err(Errno::AGAIN)
    }

    /// Reads the pending messages without blocking (`EAGAIN`: none).
    pub(crate) fn read<'a>(&self, buf: &'a mut MsgBuf) -> Result<&'a [Msg], Errno> {
        let size = std::mem::size_of_val(&buf.msgs);
        // SAFETY: the byte view covers exactly the messages array, which is
        // plain old data of which any byte pattern is a valid value.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(buf.msgs.as_mut_ptr().cast::<u8>(), size) };
        let n = rustix::io::read(&self.fd, bytes)?;
        Ok(&buf.msgs[..n / std::mem::size_of::<Msg>()])
    }
}

/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: flags by value, a new
/// userfaultfd as the return value.
struct NewUffd(usize);

// SAFETY: the opcode is `_IO(0xAA, 0x00)`, which takes an integer argument
// (the flags) and returns a new descriptor or an error; rustix turns
// negative returns into `Errno` before calling `output_from_ptr`.
unsafe impl rustix::ioctl::Ioctl for NewUffd {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> rustix::ioctl::Opcode {
        opcode::none(0xAA, 0x00)
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.0 as *mut std::ffi::c_void
    }

    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _extract_output: *mut std::ffi::c_void,
    ) -> rustix::io::Result<OwnedFd> {
        // SAFETY: a non-negative return of USERFAULTFD_IOC_NEW is a fresh
        // descriptor nobody else owns.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(out) })
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Finds the mappings (VMAs) around a range, so watches register whole VMAs:
/// registering part of one splits it, and a buffer split into several VMAs
/// can no longer be moved by mremap (EFAULT), which would change what the
/// application sees.
#[derive(Debug)]
pub(crate) struct VmaQuery {
    maps: OwnedFd,
}

impl VmaQuery {
    pub(crate) fn new() -> Result<VmaQuery, Errno> {
        use rustix::fs::{open, Mode, OFlags};
        let maps = open(
            "/proc/self/maps",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(VmaQuery { maps })
    }

    /// `[vma_start, vma_end)` of the mappings covering `start` and `end - 1`,
    /// or `None` where nothing is mapped.
    pub(crate) fn extent(&self, start: u64, end: u64) -> Result<Option<(u64, u64)>, Errno> {
        match (self.covering(start), self.covering(end - 1)) {
            (Ok(a), Ok(b)) => Ok(a.zip(b).map(|(a, b)| (a.0, b.1))),
            (Err(Errno::NOTTY | Errno::INVAL), _) | (_, Err(Errno::NOTTY | Errno::INVAL)) => {
                self.extent_from_text(start, end)
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// PROCMAP_QUERY (Linux 6.11): the VMA covering `addr`.
    fn covering(&self, addr: u64) -> Result<Option<(u64, u64)>, Errno> {
        // SAFETY: all-zero is a valid `procmap_query` (integers only; null
        // name/build-id buffers with zero sizes ask for neither).
        let mut q: uapi::procmap_query = unsafe { std::mem::zeroed() };
        q.size = std::mem::size_of::<uapi::procmap_query>() as u64;
        q.query_addr = addr;
        // SAFETY: PROCMAP_QUERY reads and writes exactly the struct whose
        // size it is told; no name or build-id buffer is passed.
        let r = unsafe {
            ioctl(
                &self.maps,
                Updater::<{ opcode::read_write::<uapi::procmap_query>(b'f', 17) }, _>::new(&mut q),
            )
        };
        match r {
            Ok(_) => Ok(Some((q.vma_start, q.vma_end))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The same from the text of /proc/self/maps (kernels before 6.11).
    fn extent_from_text(&self, start: u64, end: u64) -> Result<Option<(u64, u64)>, Errno> {
        let text = std::fs::read_to_string("/proc/self/maps").map_err(|_| Errno::IO)?;
        let vmas = text.lines().filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        });
        let (mut lo, mut hi) = (None, None);
        for (a, b) in vmas {
            if a <= start && start < b {
                lo = Some(a);
            }
            if a < end && end <= b {
                hi = Some(b);
            }
        }
        Ok(lo.zip(hi))
    }
}

/// One private page with `MADV_WIPEONFORK` holding a nonzero word: a forked
/// child sees zero there.
#[derive(Debug)]
pub(crate) struct ForkSentinel {
    page: &'static AtomicU64,
    len: usize,
}

impl ForkSentinel {
    pub(crate) fn new() -> Result<ForkSentinel, Errno> {
        let len = rustix::param::page_size();
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing, replacing nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )?
        };
        // SAFETY: `ptr` is the mapping just made, which nothing else uses.
        if let Err(e) = unsafe { rustix::mm::madvise(ptr, len, Advice::LinuxWipeOnFork) } {
            // SAFETY: unmapping the mapping just made, never shared.
            let _ = unsafe { rustix::mm::munmap(ptr, len) };
            return Err(e);
        }
        // SAFETY: the page is mapped read-write, page aligned (so aligned
        // for AtomicU64), zero-filled (a valid AtomicU64), and stays mapped
        // until `drop`, which takes `&mut self`, so no reference outlives it.
        // It is only ever accessed through this atomic.
        let page = unsafe { &*ptr.cast::<AtomicU64>() };
        page.store(1, Ordering::Relaxed);
        Ok(ForkSentinel { page, len })
    }

    /// Whether this process is a child forked after the sentinel was made.
    #[inline]
    pub(crate) fn forked(&self) -> bool {
        self.page.load(Ordering::Relaxed) == 0
    }
}

impl Drop for ForkSentinel {
    fn drop(&mut self) {
        let ptr = (self.page as *const AtomicU64).cast_mut().cast();
        // SAFETY: the mapping `new` made, of `len` bytes; `page` is not used
        // after this (we hold `&mut self`, and no borrow of it escapes).
        let _ = unsafe { rustix::mm::munmap(ptr, self.len) };
    }
}

/// Faults `[start, start + len)` in for reading or writing, without changing
/// its contents (`MADV_POPULATE_READ/WRITE`, Linux 5.14).
pub(crate) fn populate(start: u64, len: u64, write: bool) -> Result<(), Errno> {
    let advice = if write {
        Advice::LinuxPopulateWrite
    } else {
        Advice::LinuxPopulateRead
    };
    // SAFETY: populating faults pages in as an access would and changes no
    // contents; the kernel checks the range (ENOMEM for holes, EFAULT /
    // EINVAL for bad protections) without touching memory it does not map.
    unsafe { rustix::mm::madvise(start as *mut _, len as usize, advice) }
}
