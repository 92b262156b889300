//! io_uring fixed buffers as a [`regcache::Registrar`]: each cached
//! registration is one slot of a ring's sparse registered-buffer table, so
//! `IORING_OP_READ_FIXED` / `WRITE_FIXED` skip the per-I/O page pinning
//! while a registration cache keeps the table coherent with the
//! application's memory.
//!
//! Why a cache must be exact here: the kernel pins a fixed buffer's pages
//! when the slot is registered. If the application then unmaps the buffer
//! (or `free`s it, or madvises `DONTNEED`) and new memory appears at the
//! same address, a READ_FIXED at that address still returns the full count,
//! but the data goes into the *old* pages: nothing reaches the buffer the
//! application reads. [`regcache::RegCache`] over the `uffd` crate's
//! `ProcessMm` takes such a registration out of the cache before any later
//! lookup can return it.
//!
//! ```no_run
//! use io_uring::{opcode, types, IoUring};
//! use regcache::{Access, RegCache};
//! use uring_registrar::UringRegistrar;
//!
//! let ring = IoUring::new(64)?;
//! let cache = RegCache::new(uffd::ProcessMm::new()?, UringRegistrar::new(&ring, 1024)?);
//! let mut buf = vec![0u8; 1 << 20];
//! let file = std::fs::File::open("/etc/hostname")?;
//! let entry = cache.get(buf.as_mut_ptr() as u64, buf.len() as u64, Access::WRITE)?;
//! let read = opcode::ReadFixed::new(
//!     types::Fd(std::os::fd::AsRawFd::as_raw_fd(&file)),
//!     buf.as_mut_ptr(),
//!     buf.len() as u32,
//!     entry.handle().index(),
//! )
//! .build();
//! // SAFETY: `buf` and `file` outlive the request, waited for below.
//! unsafe { ring.submission_shared().push(&read)? };
//! ring.submit_and_wait(1)?;
//! drop(entry); // after the completion: the slot stays registered while cached
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! One [`UringRegistrar`] (and so one cache) per ring: the buffer table
//! belongs to the ring.
//!
//! Limits (Linux 6.x): 16 384 slots per ring; 1 GiB per buffer; anonymous,
//! shmem and hugetlbfs memory only (a regular-file mapping is refused with
//! EFAULT, reported as [`regcache::RegError::Unsupported`], so the caller
//! falls back to a plain READ); pinned bytes count against
//! `RLIMIT_MEMLOCK` unless the process has `CAP_IPC_LOCK`.
#![warn(missing_docs)]
// Every `unsafe` block lives in `sys` (the io_uring_register calls), each
// with a `// SAFETY:` argument; the other modules cannot add one.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

#[allow(unsafe_code)]
mod sys;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use regcache::{Access, Limits, RegError, Registrar};
use rustix::io::Errno;

/// Slots a ring's buffer table can have (Linux `IORING_MAX_REG_BUFFERS`).
pub const MAX_SLOTS: u32 = 1 << 14;

/// Bytes one fixed buffer can have (Linux: 1 GiB).
pub const MAX_BUFFER_LEN: u64 = 1 << 30;

/// Why a [`UringRegistrar`] could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UringError {
    /// The slot count is 0 or above [`MAX_SLOTS`].
    #[error("{0} buffer slots asked for; a ring has 1 to {MAX_SLOTS}")]
    BadSlots(u32),
    /// The ring already has a registered-buffer table (one registrar, and
    /// one cache, per ring).
    #[error(
        "the ring already has registered buffers (EBUSY): give the registrar a ring of its own"
    )]
    AlreadyRegistered,
    /// The kernel refused the table: too old for sparse tables (before
    /// 5.19: EINVAL), or out of memory.
    #[error("io_uring_register(IORING_REGISTER_BUFFERS2, sparse) failed: {0}")]
    Register(Errno),
    /// The ring descriptor could not be duplicated.
    #[error("could not duplicate the ring descriptor: {0}")]
    Dup(Errno),
}

/// The handle of one registration: a slot of the ring's buffer table and
/// the memory registered in it. Use [`index`](Self::index) as the
/// `buf_index` of READ_FIXED / WRITE_FIXED, with an address inside
/// `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedBuf {
    slot: u16,
    start: u64,
    len: u64,
}

impl FixedBuf {
    /// The slot (`buf_index` of the SQE).
    pub fn index(&self) -> u16 {
        self.slot
    }

    /// First registered address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Registered bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A ring's sparse fixed-buffer table as a registration device: a slot
/// allocator plus `IORING_REGISTER_BUFFERS_UPDATE` to fill and clear slots.
///
/// Errors map to what the cache should do: EFAULT (memory io_uring cannot
/// pin, such as a regular-file mapping, or memory unmapped meanwhile) is
/// [`RegError::Unsupported`]; ENOMEM (the memlock limit) and a full table
/// are [`RegError::Exhausted`].
///
/// A slot cleared while a request still uses its buffer is safe: the
/// kernel keeps the old buffer (and its pages) until that request
/// completes.
#[derive(Debug)]
pub struct UringRegistrar {
    ring: OwnedFd,
    slots: u32,
    free: Mutex<Vec<u16>>,
    limits: Limits,
}

impl UringRegistrar {
    /// Registers a sparse table of `slots` empty buffers on `ring` (any
    /// descriptor of an io_uring instance; it is duplicated) and returns its
    /// registrar.
    ///
    /// # Errors
    /// [`UringError`].
    pub fn new(ring: impl AsFd, slots: u32) -> Result<UringRegistrar, UringError> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(UringError::BadSlots(slots));
        }
        let ring = ring
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| UringError::Dup(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        sys::register_sparse_buffers(ring.as_fd(), slots).map_err(|e| match e {
            Errno::BUSY => UringError::AlreadyRegistered,
            e => UringError::Register(e),
        })?;
        // Slots are handed out lowest first.
        let free = (0..slots as u16).rev().collect();
        Ok(UringRegistrar {
            ring,
            slots,
            free: Mutex::new(free),
            limits: Limits {
                max_handles: slots as usize,
                max_bytes: memlock_budget(),
                max_len: MAX_BUFFER_LEN,
            },
        })
    }

    /// Slots in the table.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn take_slot(&self) -> Option<u16> {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_slot(&self, slot: u16) {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot);
    }
}

/// Bytes this process may pin in fixed buffers: `RLIMIT_MEMLOCK`, or
/// unlimited (`u64::MAX`) with `CAP_IPC_LOCK`, when io_uring does not
/// account pins. (The limit is per user: other pins of the same user count
/// against it too.)
pub fn memlock_budget() -> u64 {
    let privileged = rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::IPC_LOCK)
    });
    if privileged {
        return u64::MAX;
    }
    rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX)
}

impl Registrar for UringRegistrar {
    type Handle = FixedBuf;

    fn register(&self, start: u64, end: u64, _access: Access) -> Result<FixedBuf, RegError> {
        let len = end - start;
        let slot = self.take_slot().ok_or_else(|| {
            RegError::exhausted(format!("all {} buffer slots are in use", self.slots))
        })?;
        match sys::update_buffer(self.ring.as_fd(), slot.into(), start, len) {
            Ok(()) => Ok(FixedBuf { slot, start, len }),
            Err(e) => {
                self.give_slot(slot);
                Err(match e {
                    Errno::FAULT | Errno::OPNOTSUPP => RegError::unsupported(format!(
                        "io_uring cannot pin {start:#x}+{len:#x} ({e}): not anonymous, shmem or hugetlbfs memory, or not mapped"
                    )),
                    Errno::NOMEM => RegError::exhausted(format!(
                        "io_uring could not pin {len} more bytes ({e}): RLIMIT_MEMLOCK or memory"
                    )),
                    e => RegError::other(format!("IORING_REGISTER_BUFFERS_UPDATE of slot {slot}: {e}")),
                })
            }
        }
    }

    fn deregister(&self, buf: FixedBuf) -> Result<(), RegError> {
        let r = sys::update_buffer(self.ring.as_fd(), buf.slot.into(), 0, 0);
        // A slot whose clear failed is overwritten by its next update.
        self.give_slot(buf.slot);
        r.map_err(|e| RegError::other(format!("clearing buffer slot {}: {e}", buf.slot)))
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    /// The slot (`buf_index`): a lock-free hit's [`Hit::key`] is what a
    /// READ_FIXED / WRITE_FIXED needs, read from the cache's hit table
    /// alone.
    ///
    /// [`Hit::key`]: regcache::Hit::key
    fn hit_key(&self, buf: &FixedBuf) -> u64 {
        buf.slot.into()
    }
}
