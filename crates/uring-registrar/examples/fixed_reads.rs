//! io_uring fixed buffers through a registration cache: the pattern to
//! copy. Buffers come from the allocator and go back to it; each read asks
//! the cache for the buffer's registration (a hit after the first time),
//! submits READ_FIXED with its slot, and drops the guard once the read
//! completed. Freed buffers leave the cache on their own; memory io_uring
//! cannot register falls back to a plain read.
//!
//! ```text
//! cargo run --release -p uring-registrar --example fixed_reads
//! ```

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use regcache::{Access, RegCache};
use uffd::ProcessMm;
use uring_registrar::UringRegistrar;

/// Submits one request and waits for its result.
fn run(ring: &mut IoUring, sqe: io_uring::squeue::Entry) -> std::io::Result<i32> {
    // SAFETY: the buffer of `sqe` outlives the request: this waits for it.
    unsafe { ring.submission().push(&sqe).expect("queue has room") };
    ring.submit_and_wait(1)?;
    Ok(ring.completion().next().expect("one completion").result())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A file to read: 4 MiB of a known pattern.
    let path = std::env::temp_dir().join(format!("fixed-reads-{}", std::process::id()));
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    File::create(&path)?.write_all(&data)?;
    let file = File::open(&path)?;
    std::fs::remove_file(&path)?;

    let mut ring = IoUring::new(8)?;
    // The cache: this process's memory, the ring's buffer table (1024 slots).
    let cache = RegCache::new(ProcessMm::new()?, UringRegistrar::new(&ring, 1024)?);

    let (mut reads, mut fixed, mut fallbacks) = (0, 0, 0);
    for round in 0..200usize {
        // An application buffer: 256 KiB, so glibc maps and unmaps it.
        let len = 256 << 10;
        let mut buf = vec![0u8; len];
        let off = (round * 4096) % (data.len() - len);
        let fd = types::Fd(file.as_raw_fd());
        let n = match cache.get(buf.as_mut_ptr() as u64, len as u64, Access::WRITE) {
            Ok(entry) => {
                fixed += 1;
                let sqe = opcode::ReadFixed::new(
                    fd,
                    buf.as_mut_ptr(),
                    len as u32,
                    entry.handle().index(),
                )
                .offset(off as u64)
                .build();
                run(&mut ring, sqe)?
                // `entry` dropped here, after the completion.
            }
            Err(e) if e.fall_back() => {
                fallbacks += 1;
                let sqe = opcode::Read::new(fd, buf.as_mut_ptr(), len as u32)
                    .offset(off as u64)
                    .build();
                run(&mut ring, sqe)?
            }
            Err(e) => return Err(e.into()),
        };
        if n != len as i32 || buf != data[off..off + len] {
            return Err(
                format!("read {round} returned {n} and wrong data: a stale registration").into(),
            );
        }
        reads += 1;
        // `buf` is freed here: the allocator unmaps it, the cache drops its
        // registration, and the next round's buffer (often at the same
        // address) is registered anew.
    }
    // Memory the cache cannot register (a private mapping of a regular
    // file): the lookup says to fall back, and a plain read does the job.
    let len = 64 << 10;
    // SAFETY: a fresh private mapping of the file replaces nothing.
    let map = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
            &file,
            0,
        )?
    };
    let e = cache
        .get(map as u64, len as u64, Access::WRITE)
        .unwrap_err();
    assert!(e.fall_back(), "{e}");
    let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), map.cast(), len as u32)
        .offset(4096)
        .build();
    assert_eq!(run(&mut ring, sqe)?, len as i32);
    fallbacks += 1;
    println!("a file mapping: {e}; read it without a registration");
    // SAFETY: our own mapping, no reference into it remains.
    unsafe { rustix::mm::munmap(map, len)? };

    let s = cache.stats();
    println!(
        "{reads} reads verified ({fixed} READ_FIXED, {fallbacks} plain); cache: {} hits, {} misses, {} invalidated, {} slots free",
        s.hits.load(std::sync::atomic::Ordering::Relaxed),
        s.misses.load(std::sync::atomic::Ordering::Relaxed),
        s.invalidated.load(std::sync::atomic::Ordering::Relaxed),
        cache.registrar().free_slots(),
    );
    Ok(())
}
