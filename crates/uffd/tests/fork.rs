//! A real fork: the child must not use the parent's registrations. Its own
//! test binary, so the only other threads at fork time are the harness's
//! and the monitor.

mod common;

use common::*;
use regcache::Access;
use uffd::UffdError;

#[test]
fn a_forked_child_refuses_the_parents_registrations() {
    let Some(mm) = process_mm() else { return };
    let cache = common::cache(&mm, 16);
    let a = map(4);
    write_word(a, 42);
    let r = cache.get(a, 4 * P, Access::READ_WRITE).unwrap();
    // SAFETY: the child only makes async-signal-safe calls (loads, the
    // atomic checks of `flush`, and _exit) before exiting.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // The child: same addresses, copied pages, no monitor. Every call
        // that could hand out a registration must refuse.
        let code = if read_word(a) != 42 {
            2
        } else if !matches!(mm.flush(), Err(UffdError::Forked)) {
            3
        } else if mm.is_live() {
            4
        } else if cache.get(a, P, Access::READ_WRITE).is_ok() {
            5
        } else if mm.watch(a, P).is_ok() {
            6
        } else {
            0
        };
        // SAFETY: leaving the child without running the parent's atexit
        // handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child crashed: {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "child check failed");
    // The parent is unaffected: fork changed nothing it registered.
    mm.flush().unwrap();
    assert!(r.is_valid());
    assert_eq!(
        cache.get(a, 4 * P, Access::READ_WRITE).unwrap().id(),
        r.id()
    );
    drop(cache);
    unmap(a, 4);
}
