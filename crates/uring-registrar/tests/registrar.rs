//! The io_uring registrar on its own: slots, errors, and what a cleared slot
//! means for a READ_FIXED.

mod common;

use common::{pattern_file, skip, Ring};
use regcache::{Access, RegError, Registrar};
use uring_registrar::{UringError, UringRegistrar, MAX_SLOTS};

const P: u64 = 4096;

fn ring_or_skip() -> Option<Ring> {
    if let Err(why) = common::memlock_allows(1 << 20) {
        skip(why);
        return None;
    }
    match Ring::new() {
        Ok(r) => Some(r),
        Err(e) => {
            skip(format!("io_uring unavailable: {e}"));
            None
        }
    }
}

fn anon(pages: u64) -> u64 {
    common::anon(pages * P)
}

#[test]
fn bad_slot_counts_and_a_second_table_are_refused() {
    let Some(ring) = ring_or_skip() else { return };
    ring.with(|r| {
        assert!(matches!(
            UringRegistrar::new(r, 0),
            Err(UringError::BadSlots(0))
        ));
        assert!(matches!(
            UringRegistrar::new(r, MAX_SLOTS + 1),
            Err(UringError::BadSlots(_))
        ));
        let first = UringRegistrar::new(r, 4).unwrap();
        let e = UringRegistrar::new(r, 4).unwrap_err();
        assert!(matches!(e, UringError::AlreadyRegistered), "{e}");
        assert!(e.to_string().contains("ring of its own"));
        drop(first);
    });
}

#[test]
fn slots_run_out_as_exhausted_and_come_back_on_deregister() {
    let Some(ring) = ring_or_skip() else { return };
    let reg = ring.with(|r| UringRegistrar::new(r, 2)).unwrap();
    assert_eq!(reg.limits().max_handles, 2);
    let a = anon(3);
    let x = reg.register(a, a + P, Access::WRITE).unwrap();
    let y = reg.register(a + P, a + 2 * P, Access::WRITE).unwrap();
    assert_ne!(x.index(), y.index());
    assert_eq!(reg.free_slots(), 0);
    let e = reg
        .register(a + 2 * P, a + 3 * P, Access::WRITE)
        .unwrap_err();
    assert!(matches!(e, RegError::Exhausted(_)), "{e}");
    reg.deregister(x).unwrap();
    assert_eq!(reg.free_slots(), 1);
    let z = reg.register(a + 2 * P, a + 3 * P, Access::WRITE).unwrap();
    assert_eq!(z.index(), x.index(), "the freed slot is reused");
    reg.deregister(y).unwrap();
    reg.deregister(z).unwrap();
    assert_eq!(reg.free_slots(), 2);
}

#[test]
fn memory_io_uring_cannot_pin_is_unsupported() {
    let Some(ring) = ring_or_skip() else { return };
    let reg = ring.with(|r| UringRegistrar::new(r, 4)).unwrap();
    // Memory that cannot be pinned: a PROT_NONE mapping. (Not an unmapped
    // range: another test thread's mmap may take the hole before the call,
    // and the registration then succeeds.)
    let a = anon(1);
    // SAFETY: our own mapping, nothing refers to it.
    assert_eq!(
        unsafe { libc::mprotect(a as *mut _, P as usize, libc::PROT_NONE) },
        0
    );
    let e = reg.register(a, a + P, Access::WRITE).unwrap_err();
    assert!(matches!(e, RegError::Unsupported(_)), "{e}");
    // SAFETY: our own mapping, nothing refers to it.
    unsafe { libc::munmap(a as *mut _, P as usize) };
    // A shared, writable mapping of a regular file on a disk file system
    // (the build directory; tmpfs files are shmem and may be registered).
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("registrar-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(P).unwrap();
    std::fs::remove_file(&path).unwrap();
    // SAFETY: a fresh shared mapping of our own file.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            P as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_ne!(m, libc::MAP_FAILED);
    let e = reg
        .register(m as u64, m as u64 + P, Access::WRITE)
        .unwrap_err();
    assert!(matches!(e, RegError::Unsupported(_)), "{e}");
    assert_eq!(
        reg.free_slots(),
        4,
        "failed registrations give their slot back"
    );
    // SAFETY: our own mapping.
    unsafe { libc::munmap(m, P as usize) };
}

#[test]
fn a_cleared_slot_refuses_reads_and_a_registered_one_reads() {
    let Some(ring) = ring_or_skip() else { return };
    let reg = ring.with(|r| UringRegistrar::new(r, 1)).unwrap();
    let (file, data) = pattern_file(&std::env::temp_dir(), 4 * P as usize);
    let a = anon(1);
    let h = reg.register(a, a + P, Access::WRITE).unwrap();
    assert_eq!(ring.read_fixed(&file, a, P as u32, h.index(), P), P as i32);
    // SAFETY: our own mapping, just read into.
    let got = unsafe { std::slice::from_raw_parts(a as *const u8, P as usize) };
    assert_eq!(got, &data[P as usize..2 * P as usize]);
    let index = h.index();
    reg.deregister(h).unwrap();
    // The slot is empty now: the kernel refuses the request (EFAULT).
    assert!(ring.read_fixed(&file, a, P as u32, index, 0) < 0);
}
