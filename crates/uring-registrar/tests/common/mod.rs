//! Set-up shared by the end-to-end test, the benchmark and the example: a
//! ring behind a lock, a file with known contents, and the skip rules.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};

/// A ring shared by threads: one request in flight at a time.
pub struct Ring {
    ring: Mutex<IoUring>,
}

impl Ring {
    /// A ring of 64 entries.
    pub fn new() -> std::io::Result<Ring> {
        Ok(Ring {
            ring: Mutex::new(IoUring::new(64)?),
        })
    }

    /// Runs a closure with the ring (for `UringRegistrar::new`).
    pub fn with<T>(&self, f: impl FnOnce(&IoUring) -> T) -> T {
        f(&self.ring.lock().unwrap())
    }

    fn run(&self, sqe: io_uring::squeue::Entry) -> i32 {
        let mut ring = self.ring.lock().unwrap();
        // SAFETY: the callers' buffers stay valid until the completion,
        // which is waited for before this returns.
        unsafe { ring.submission().push(&sqe).expect("submission queue full") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        let cqe = ring.completion().next().expect("a completion");
        cqe.result()
    }

    /// READ_FIXED of `len` bytes at file offset `off` into `buf` through
    /// buffer slot `index`; the result (bytes or -errno).
    pub fn read_fixed(&self, file: &File, buf: u64, len: u32, index: u16, off: u64) -> i32 {
        let sqe = opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), buf as *mut u8, len, index)
            .offset(off)
            .build();
        self.run(sqe)
    }

    /// A plain READ (the kernel pins the pages for this request only).
    pub fn read(&self, file: &File, buf: u64, len: u32, off: u64) -> i32 {
        let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), buf as *mut u8, len)
            .offset(off)
            .build();
        self.run(sqe)
    }
}

/// The contents of the test file: 8-byte words that differ at every offset.
pub fn contents(len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| {
            (i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17)
                .to_le_bytes()
        })
        .collect()
}

/// A file of `len` bytes with [`contents`] in `dir` (removed when closed:
/// it is unlinked at once), and the contents.
pub fn pattern_file(dir: &std::path::Path, len: usize) -> (File, Vec<u8>) {
    let path = dir.join(format!("uring-registrar-{}-{}", std::process::id(), len));
    let data = contents(len);
    let mut f = File::create(&path).expect("create the test file");
    f.write_all(&data).expect("write the test file");
    drop(f);
    let f = File::open(&path).expect("open the test file");
    std::fs::remove_file(&path).expect("unlink the test file");
    (f, data)
}

/// Where a test that cannot run here stops: a printed reason, or a panic in
/// CI (which runs as root on a kernel with io_uring and userfaultfd, so
/// there a skip would hide a failure).
pub fn skip(why: String) {
    if std::env::var_os("CI").is_some() {
        panic!("cannot run in CI: {why}");
    }
    eprintln!("skipped: {why}");
}

/// Whether `bytes` may be pinned (see `uring_registrar::memlock_budget`);
/// `Err` names the limit.
pub fn memlock_allows(bytes: u64) -> Result<(), String> {
    let budget = uring_registrar::memlock_budget();
    if budget < bytes {
        return Err(format!(
            "RLIMIT_MEMLOCK is {budget} bytes and the test pins up to {bytes} (raise it with ulimit -l, or run with CAP_IPC_LOCK)"
        ));
    }
    Ok(())
}

/// A fresh private anonymous mapping of `len` bytes (page aligned), never
/// unmapped by this helper.
pub fn anon(len: u64) -> u64 {
    // SAFETY: a fresh anonymous mapping replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p as u64
}
