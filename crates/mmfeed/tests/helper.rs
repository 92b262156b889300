//! The privileged helper, running with only CAP_BPF and CAP_PERFMON: a
//! client without any capability gets a feed of its own calls (and only its
//! own) from the helper, with no `bpf()` call.
//! A test binary of its own: the client is a forked child, which must not
//! inherit locks held by other test threads.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;
use mmfeed::{Feed, FeedError, FeedMm, FeedSource, Kind, Programs};

/// Steps of the child, as exit codes.
const OK: i32 = 0;
const STILL_PRIVILEGED: i32 = 10;
const CONNECT_FAILED: i32 = 11;
const NO_RECORD: i32 = 12;
const WRONG_SOURCE: i32 = 13;

/// CAP_PERFMON and CAP_BPF: all the helper is given.
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The helper, started with every capability but CAP_BPF and CAP_PERFMON
/// dropped from its bounding set, so that its exec (as uid 0) grants it
/// those two and nothing else.
fn helper_with_two_capabilities(socket: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mmfeed-helper"));
    cmd.arg(socket).stdout(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and makes
    // only prctl calls (async-signal-safe, no allocation, no lock).
    unsafe {
        cmd.pre_exec(|| {
            for cap in 0..64u32 {
                if cap != CAP_BPF && cap != CAP_PERFMON {
                    // Past the kernel's last capability this fails: fine.
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                }
            }
            Ok(())
        });
    }
    cmd
}

/// The effective capability set of process `pid`, from /proc.
fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(line.trim(), 16).unwrap()
}

fn child(socket: &std::path::Path) -> i32 {
    // Drop every privilege: root's capabilities go with the uid.
    // SAFETY: plain system calls on this process's own credentials.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(65534) != 0
            || libc::setuid(65534) != 0
        {
            return STILL_PRIVILEGED;
        }
    }
    if Programs::load().is_ok() {
        return STILL_PRIVILEGED;
    }
    let feed = match Feed::connect(socket) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("child: {e}");
            return CONNECT_FAILED;
        }
    };
    if feed.source() != FeedSource::Helper(socket.to_path_buf()) {
        return WRONG_SOURCE;
    }
    let Ok(mm) = FeedMm::with_feed(feed) else {
        return NO_RECORD;
    };
    let a = map(2);
    let got = records_during(mm.feed(), || {
        raw_munmap(a, 2 * P);
    });
    if got != vec![unmap_start(a, a + 2 * P), Kind::End] {
        eprintln!("child: {got:?}");
        return NO_RECORD;
    }
    OK
}

#[test]
fn a_client_without_capabilities_gets_its_own_feed_from_the_helper() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: starting the helper and dropping to an unprivileged client needs root");
        return;
    }
    let socket = std::env::temp_dir().join(format!("mmfeed-test-{}.sock", std::process::id()));
    let mut helper = helper_with_two_capabilities(&socket)
        .spawn()
        .expect("start the helper");
    let mut line = String::new();
    BufReader::new(helper.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the helper did not start");
    assert_eq!(
        effective_capabilities(helper.id()),
        (1 << CAP_BPF) | (1 << CAP_PERFMON),
        "the helper runs with CAP_BPF and CAP_PERFMON only"
    );

    // The parent is a client too; the child's calls must not reach it.
    let parent = Feed::connect(&socket).expect("the parent's feed");
    let from = parent.head();
    // A second connection of the same process is refused (one feed each).
    let again = mmfeed_connect_raw(&socket);
    assert!(again.contains("already has a feed"), "{again:?}");

    // SAFETY: the child runs `child` (no lock another thread of this binary
    // could hold: this is its only test) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = child(&socket);
        // SAFETY: ends the child without the harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let _ = helper.kill();
    let _ = helper.wait();
    let _ = std::fs::remove_file(&socket);
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        OK,
        "the unprivileged client failed (see the codes)"
    );
    let leaked: Vec<_> = (from..parent.head())
        .filter_map(|i| parent.record(i))
        .filter(|r| r.tid as i32 >= pid && r.tid as i32 <= pid + 64)
        .collect();
    assert!(
        leaked.is_empty(),
        "the parent saw the child's calls: {leaked:?}"
    );
}

/// What the helper answers a second connection of this process.
fn mmfeed_connect_raw(socket: &std::path::Path) -> String {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[allow(dead_code)]
fn _error_is_public(e: FeedError) -> String {
    e.to_string()
}
