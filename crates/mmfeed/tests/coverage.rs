//! Every system call the feed covers publishes its START with the exact
//! range, and the END, before the call returns: at the attach point the
//! loader probes first (the `syscalls` tracepoints here), and, in a second
//! run of this binary, at the BTF raw tracepoints.

mod common;

use common::*;
use mmfeed::Kind;
use mmu_notifier::Event;

#[test]
fn munmap_publishes_start_then_end() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    let got = records_during(&feed, || assert_eq!(raw_munmap(a + P, 2 * P), 0));
    assert_eq!(got, vec![unmap_start(a + P, a + 3 * P), Kind::End]);
    raw_munmap(a, 4 * P);
}

#[test]
fn an_unaligned_length_is_rounded_up_to_pages() {
    let Some(feed) = feed() else { return };
    let a = map(2);
    let got = records_during(&feed, || assert_eq!(raw_munmap(a, P + 1), 0));
    assert_eq!(got, vec![unmap_start(a, a + 2 * P), Kind::End]);
}

#[test]
fn mremap_shrink_publishes_the_tail() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    let got = records_during(&feed, || {
        // SAFETY: the test's own mapping, no reference into it.
        let r = unsafe { libc::mremap(a as *mut _, (4 * P) as usize, P as usize, 0) };
        assert_eq!(r as u64, a);
    });
    assert_eq!(got, vec![unmap_start(a + P, a + 4 * P), Kind::End]);
    raw_munmap(a, P);
}

#[test]
fn mremap_fixed_publishes_the_source_and_the_replaced_target() {
    let Some(feed) = feed() else { return };
    let a = map(2);
    let b = map(3);
    let got = records_during(&feed, || {
        // SAFETY: moves the test's own mapping over another of its own.
        let r = unsafe {
            libc::mremap(
                a as *mut _,
                (2 * P) as usize,
                (2 * P) as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                b as *mut libc::c_void,
            )
        };
        assert_eq!(r as u64, b);
    });
    assert_eq!(
        got,
        vec![
            unmap_start(a, a + 2 * P),
            unmap_start(b, b + 2 * P),
            Kind::End
        ]
    );
    raw_munmap(b, 3 * P);
}

#[test]
fn mremap_growth_that_may_move_publishes_the_source() {
    let Some(feed) = feed() else { return };
    let a = map(2);
    let mut moved = 0;
    let got = records_during(&feed, || {
        // SAFETY: the test's own mapping, no reference into it.
        let r = unsafe {
            libc::mremap(
                a as *mut _,
                (2 * P) as usize,
                (64 * P) as usize,
                libc::MREMAP_MAYMOVE,
            )
        };
        assert_ne!(r, libc::MAP_FAILED);
        moved = r as u64;
    });
    assert_eq!(got, vec![unmap_start(a, a + 2 * P), Kind::End]);
    raw_munmap(moved, 64 * P);
}

#[test]
fn mremap_growth_in_place_publishes_nothing() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    raw_munmap(a + 2 * P, 2 * P);
    let got = records_during(&feed, || {
        // SAFETY: grows the test's own mapping into the hole it just made
        // (or fails); nothing else is touched.
        unsafe { libc::mremap(a as *mut _, (2 * P) as usize, (3 * P) as usize, 0) };
    });
    assert_eq!(got, vec![]);
    raw_munmap(a, 4 * P);
}

#[test]
fn mmap_fixed_over_a_mapping_publishes_it_and_noreplace_does_not() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    let fixed = |flags| {
        // SAFETY: maps over the test's own mapping, no reference into it.
        unsafe {
            libc::mmap(
                (a + P) as *mut _,
                (2 * P) as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        }
    };
    let got = records_during(&feed, || assert_eq!(fixed(libc::MAP_FIXED) as u64, a + P));
    assert_eq!(got, vec![unmap_start(a + P, a + 3 * P), Kind::End]);
    let got = records_during(&feed, || {
        assert_eq!(fixed(libc::MAP_FIXED_NOREPLACE), libc::MAP_FAILED);
    });
    assert_eq!(got, vec![]);
    // A plain mmap (the allocator's) publishes nothing either.
    let got = records_during(&feed, || {
        map(1);
    });
    assert_eq!(got, vec![]);
    raw_munmap(a, 4 * P);
}

#[test]
fn madvise_that_drops_pages_publishes_a_clear() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    let shared = map_flags(4, libc::MAP_SHARED);
    let clear = |s: u64, e: u64| Kind::Start {
        start: s,
        end: e,
        event: Event::Clear,
    };
    for (advice, at) in [
        (libc::MADV_DONTNEED, a),
        (libc::MADV_FREE, a),
        (libc::MADV_REMOVE, shared),
        (24 /* MADV_DONTNEED_LOCKED */, a),
        (102 /* MADV_GUARD_INSTALL */, a),
    ] {
        let mut ret = 0;
        let got = records_during(&feed, || {
            // SAFETY: drops the contents of the test's own mappings, which
            // no reference observes.
            ret = unsafe { libc::madvise((at + P) as *mut _, (2 * P) as usize, advice) };
        });
        assert_eq!(
            got,
            vec![clear(at + P, at + 3 * P), Kind::End],
            "advice {advice} (returned {ret})"
        );
    }
    // Advice that keeps the contents publishes nothing.
    let got = records_during(&feed, || {
        // SAFETY: advice only.
        unsafe { libc::madvise(a as *mut _, P as usize, libc::MADV_WILLNEED) };
    });
    assert_eq!(got, vec![]);
    raw_munmap(a, 4 * P);
    raw_munmap(shared, 4 * P);
}

#[test]
fn shmdt_and_process_madvise_flush_everything() {
    let Some(feed) = feed() else { return };
    let everything = |event| Kind::Start {
        start: 0,
        end: u64::MAX,
        event,
    };
    // SAFETY: a private segment of one page, attached where the kernel
    // chooses, detached below, and removed.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, P as usize, libc::IPC_CREAT | 0o600) };
    assert!(id >= 0, "shmget");
    // SAFETY: as above.
    let at = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    assert_ne!(at as isize, -1, "shmat");
    let got = records_during(&feed, || {
        // SAFETY: detaches the segment attached above; nothing refers to it.
        assert_eq!(unsafe { libc::shmdt(at) }, 0);
    });
    // SAFETY: removes the segment created above.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    assert_eq!(got, vec![everything(Event::Unmap), Kind::End]);

    let a = map(1);
    let got = records_during(&feed, || {
        let iov = libc::iovec {
            iov_base: a as *mut _,
            iov_len: P as usize,
        };
        // SAFETY: pidfd_open of ourselves; process_madvise(MADV_COLD) on
        // our own page only ages it.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0);
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd,
                &iov,
                1,
                libc::MADV_COLD,
                0,
            );
            libc::close(pidfd as i32);
        }
    });
    // The close of the pidfd publishes nothing: only the madvise.
    assert_eq!(got, vec![everything(Event::Clear), Kind::End]);
    raw_munmap(a, P);
}

#[test]
fn shmat_remap_and_io_destroy_flush_everything() {
    let Some(feed) = feed() else { return };
    let everything = Kind::Start {
        start: 0,
        end: u64::MAX,
        event: Event::Unmap,
    };
    // SAFETY: a private segment of one page, removed below.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, P as usize, libc::IPC_CREAT | 0o600) };
    assert!(id >= 0, "shmget");
    let a = map(1);
    let mut at = std::ptr::null_mut();
    let got = records_during(&feed, || {
        // SAFETY: attaches the segment over the test's own page, which no
        // reference observes (SHM_REMAP replaces it).
        at = unsafe { libc::shmat(id, a as *const _, libc::SHM_REMAP) };
    });
    assert_eq!(at as u64, a, "shmat SHM_REMAP");
    assert_eq!(got, vec![everything, Kind::End]);
    // Without SHM_REMAP nothing is replaced: nothing is published.
    let got = records_during(&feed, || {
        // SAFETY: attaches the segment where the kernel chooses.
        let b = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        assert_ne!(b as isize, -1);
        // SAFETY: detaches the attachment made just above.
        unsafe { libc::shmdt(b) };
    });
    assert_eq!(got, vec![everything, Kind::End], "only the shmdt");
    // SAFETY: detaches the first attachment and removes the segment.
    unsafe {
        libc::shmdt(at);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
    }

    let mut ctx: libc::c_ulong = 0;
    // SAFETY: io_setup writes the new AIO context's id into `ctx`.
    let r = unsafe { libc::syscall(libc::SYS_io_setup, 1, &mut ctx as *mut libc::c_ulong) };
    assert_eq!(r, 0, "io_setup");
    let got = records_during(&feed, || {
        // SAFETY: destroys the context made above, which has no I/O.
        assert_eq!(unsafe { libc::syscall(libc::SYS_io_destroy, ctx) }, 0);
    });
    assert_eq!(got, vec![everything, Kind::End]);
}

#[test]
fn a_thread_created_after_the_feed_is_covered() {
    let Some(feed) = feed() else { return };
    let a = map(2);
    let got =
        std::thread::spawn(move || records_during(&feed, || assert_eq!(raw_munmap(a, 2 * P), 0)))
            .join()
            .unwrap();
    assert_eq!(got, vec![unmap_start(a, a + 2 * P), Kind::End]);
}

/// `ProcessSpace` takes the best source this machine allows and says which:
/// a feed where BPF is allowed (here, with no helper socket, one loaded by
/// this process), userfaultfd otherwise; either way a cache over it drops
/// a registration whose page was unmapped.
#[test]
fn process_space_reports_the_path_it_chose_and_keeps_a_cache_exact() {
    use mmfeed::{ActivePath, ProcessSpace};
    use regcache::{Access, RegCache};
    let bpf = feed().is_some();
    let space = match ProcessSpace::new() {
        Ok(s) => s,
        Err(e) if !bpf => {
            eprintln!("SKIPPED: neither source is available: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    match space.path() {
        ActivePath::Loaded | ActivePath::Helper(_) | ActivePath::Pinned(_) => {
            assert!(bpf, "{:?}", space.path())
        }
        ActivePath::Userfaultfd(why) => assert!(!bpf && !why.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(!space.path().to_string().is_empty());
    let cache = RegCache::new(space, uffd::Populate);
    let a = map(1);
    write_tag(a, 1);
    let first = cache.get(a, P, Access::READ).unwrap().id();
    assert_eq!(cache.get(a, P, Access::READ).unwrap().id(), first);
    assert_eq!(raw_munmap(a, P), 0);
    let b = map(1);
    write_tag(b, 2);
    if b == a {
        assert_ne!(cache.get(b, P, Access::READ).unwrap().id(), first);
    }
    raw_munmap(b, P);
}

/// Runs every other test of this binary again in a process of its own
/// whose feed is on the BTF raw tracepoints (the attach point taken where
/// the `syscalls` tracepoints are missing).
#[test]
fn every_call_is_covered_at_the_btf_raw_tracepoints_too() {
    if std::env::var_os(mmfeed::ATTACH_ENV).is_some() || feed().is_none() {
        return; // the run inside, or BPF refused (the reason is printed)
    }
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIPPED: the tp_btf programs are x86-64's");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(mmfeed::ATTACH_ENV, "tp_btf")
        .args([
            "--skip",
            "every_call_is_covered_at_the_btf_raw_tracepoints_too",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "at tp_btf:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every other test of this binary ran there (none filtered out but
    // this one) and passed.
    let ran = report
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok());
    assert!(ran.is_some_and(|n| n >= 12), "{report}");
}
