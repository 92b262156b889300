//! An io_uring MADVISE submitted with `IOSQE_CQE_SKIP_SUCCESS` posts no
//! completion when it succeeds, so the feed cannot see its end. The feed is
//! the process's, so this test has a process (a test binary) of its own.

mod common;

use common::*;
use io_uring::squeue;
use mmfeed::FeedError;
use regcache::{Access, RegCache};

/// Without a completion its end cannot be seen: the range is invalidated
/// and every lookup from then on fails with a clear error (never a stale
/// hit, never a wait that cannot end).
#[test]
fn an_io_uring_madvise_that_posts_no_completion_makes_the_feed_untrusted() {
    let Some(mm) = feed_mm() else { return };
    let cache = RegCache::new(mm, uffd::Populate);
    let a = map(1);
    write_tag(a, 1);
    let reg = cache.get(a, P, Access::READ).unwrap();
    let completions = uring_madvise(a, P, libc::MADV_DONTNEED, squeue::Flags::SKIP_SUCCESS);
    assert_eq!(completions, vec![(2, 0)], "the madvise posted nothing");
    for _ in 0..2 {
        match cache.space().flush() {
            Err(FeedError::Unpaired) => {}
            other => panic!("expected Unpaired, got {other:?}"),
        }
    }
    assert!(!reg.is_valid(), "its range was invalidated all the same");
    assert!(cache.get(a, P, Access::READ).is_err());
    drop(reg);
    raw_munmap(a, P);
}
