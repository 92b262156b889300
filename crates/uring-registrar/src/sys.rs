//! The io_uring_register(2) calls: every `unsafe` block of the crate.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::io_uring::{
    io_uring_ptr, io_uring_register, io_uring_rsrc_register, io_uring_rsrc_update2, iovec,
    IoringRegisterOp, IoringRsrcFlags,
};

/// Gives `ring` a table of `slots` empty buffer slots
/// (`IORING_REGISTER_BUFFERS2` with `IORING_RSRC_REGISTER_SPARSE`).
pub(crate) fn register_sparse_buffers(ring: BorrowedFd<'_>, slots: u32) -> Result<(), Errno> {
    let mut arg = io_uring_rsrc_register::default();
    arg.nr = slots;
    arg.flags = IoringRsrcFlags::REGISTER_SPARSE;
    // SAFETY: `arg` is a valid `io_uring_rsrc_register` that lives across the
    // call; with REGISTER_SPARSE its null `data` and `tags` are not read; the
    // size argument is the struct's size, as the opcode requires. The kernel
    // only reads it during the call.
    unsafe {
        io_uring_register(
            ring,
            IoringRegisterOp::RegisterBuffers2,
            (&arg as *const io_uring_rsrc_register).cast(),
            std::mem::size_of::<io_uring_rsrc_register>() as u32,
        )
    }
    .map(drop)
}

/// Points buffer slot `slot` at `[addr, addr + len)`, or clears it when
/// `len` is 0 (`IORING_REGISTER_BUFFERS_UPDATE`). The kernel pins the pages
/// of a new buffer and releases the slot's old buffer once the requests
/// using it complete.
pub(crate) fn update_buffer(
    ring: BorrowedFd<'_>,
    slot: u32,
    addr: u64,
    len: u64,
) -> Result<(), Errno> {
    let mut iov = iovec {
        iov_base: if len == 0 {
            std::ptr::null_mut()
        } else {
            addr as *mut _
        },
        iov_len: len as usize,
    };
    let mut up = io_uring_rsrc_update2::default();
    up.offset = slot;
    up.data = io_uring_ptr::new((&mut iov as *mut iovec).cast());
    up.tags = io_uring_ptr::null();
    up.nr = 1;
    // SAFETY: `up` and the one `iovec` it points to live across the call and
    // are only read by the kernel during it; null `tags` means no tags. The
    // iovec names process memory by address only: no Rust reference to that
    // memory exists or is created, and the kernel validates and pins it
    // (EFAULT for memory it cannot pin). The size argument is the struct's
    // size, as the opcode requires.
    let n = unsafe {
        io_uring_register(
            ring,
            IoringRegisterOp::RegisterBuffersUpdate,
            (&up as *const io_uring_rsrc_update2).cast(),
            std::mem::size_of::<io_uring_rsrc_update2>() as u32,
        )
    }?;
    if n == 1 {
        Ok(())
    } else {
        Err(Errno::IO)
    }
}
