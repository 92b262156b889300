//! The overrun: a test binary of its own, because lapping the process's
//! feed would lose the records the other tests read.

mod common;

use common::*;

/// A reader that falls more than a feed behind cannot know what changed:
/// it invalidates everything, once, and counts it.
#[test]
fn an_overrun_invalidates_everything_and_is_counted() {
    use regcache::{Access, RegCache};
    use std::sync::atomic::Ordering;
    let Some(mm) = feed_mm() else { return };
    let cache = RegCache::new(mm, uffd::Populate);
    let a = map(1);
    write_tag(a, 1);
    let kept = cache.get(a, P, Access::READ).unwrap();
    // Two records per munmap, none applied: the feed laps this reader.
    for _ in 0..mmfeed::SLOTS {
        let p = map(1);
        assert_eq!(raw_munmap(p, P), 0);
    }
    assert!(kept.is_valid(), "nothing applied yet");
    let again = cache.get(a, P, Access::READ).unwrap();
    let stats = cache.space().stats();
    assert_eq!(stats.overruns.load(Ordering::Relaxed), 1);
    assert!(!kept.is_valid(), "the overrun invalidated everything");
    assert_ne!(again.id(), kept.id());
    drop((kept, again));
    raw_munmap(a, P);
}
