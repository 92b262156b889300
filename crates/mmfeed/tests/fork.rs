//! Fork: a test binary of its own, so that the child is forked while no
//! other test thread holds a lock the child's drop of the feed would take.

mod common;

use common::*;
use mmfeed::Kind;

/// A forked child does not get lookups through the parent's feed (which
/// records the parent's calls, not the child's): its flush fails, and its
/// drop of the copy leaves the parent's feed registered.
#[test]
fn a_forked_child_drops_the_feed() {
    let Some(mm) = feed_mm() else { return };
    // SAFETY: the child only reads memory, calls flush (no allocation on
    // its error path), drops `mm` and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let code = match mm.flush() {
            Err(mmfeed::FeedError::Forked) => 0,
            Ok(()) => 1,
            Err(_) => 2,
        };
        drop(mm);
        // SAFETY: leaves the child without running the parent's atexit
        // handlers or test harness.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: {status:#x}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's flush did not fail with Forked"
    );
    // The parent's feed still sees its calls.
    let a = map(1);
    let got = records_during(mm.feed(), || assert_eq!(raw_munmap(a, P), 0));
    assert_eq!(got, vec![unmap_start(a, a + P), Kind::End]);
    mm.flush().unwrap();
}
