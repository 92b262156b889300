//! io_uring's `IORING_OP_MADVISE` through the feed: its START when it is
//! queued for its io-wq worker and its END when its completion is posted,
//! paired by the request's token. (Without a completion to see, in
//! `uring_unpaired.rs`: it makes every feed of the process untrusted.)

mod common;

use common::*;
use io_uring::squeue;
use mmfeed::{Feed, Kind, Record};
use mmu_notifier::Event;
use regcache::{Access, RegCache};

/// Owner tokens of io_uring requests have the top bit set (thread ids never
/// do).
const TOKEN_BIT: u32 = 0x8000_0000;

/// The records of io_uring requests (token owners) published while `f` ran.
fn request_records_during(feed: &Feed, f: impl FnOnce()) -> Vec<Record> {
    let from = feed.head();
    f();
    let to = feed.head();
    (from..to)
        .filter_map(|i| feed.record(i))
        .filter(|r| r.tid & TOKEN_BIT != 0)
        .collect()
}

#[test]
fn an_io_uring_madvise_publishes_start_when_queued_and_end_when_complete() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    for advice in [libc::MADV_DONTNEED, libc::MADV_FREE] {
        let mut completions = Vec::new();
        let got = request_records_during(&feed, || {
            completions = uring_madvise(a + P, 2 * P, advice, squeue::Flags::empty());
        });
        assert_eq!(completions, vec![(1, 0), (2, 0)], "advice {advice}");
        let kinds: Vec<Kind> = got.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            vec![
                Kind::Start {
                    start: a + P,
                    end: a + 3 * P,
                    event: Event::Clear
                },
                Kind::End
            ],
            "advice {advice}"
        );
        assert_eq!(got[0].tid, got[1].tid, "START and END share the token");
    }
    // Advice that keeps the contents publishes nothing.
    let got = request_records_during(&feed, || {
        uring_madvise(a, P, libc::MADV_WILLNEED, squeue::Flags::empty());
    });
    assert_eq!(got, vec![]);
    raw_munmap(a, 4 * P);
}

/// The madvise drives the cache: a registration of the dropped page is
/// gone before the next lookup can hit it.
#[test]
fn an_io_uring_madvise_drops_the_registration_of_its_pages() {
    let Some(mm) = feed_mm() else { return };
    let cache = RegCache::new(mm, uffd::Populate);
    let a = map(2);
    write_tag(a, 1);
    write_tag(a + P, 2);
    let dropped = cache.get(a, P, Access::READ).unwrap();
    let kept = cache.get(a + P, P, Access::READ).unwrap();
    uring_madvise(a, P, libc::MADV_DONTNEED, squeue::Flags::empty());
    let again = cache.get(a, P, Access::READ).unwrap();
    assert!(!dropped.is_valid(), "the madvise invalidated its page");
    assert_ne!(again.id(), dropped.id());
    assert!(kept.is_valid(), "and nothing else");
    assert_eq!(cache.get(a + P, P, Access::READ).unwrap().id(), kept.id());
    drop((dropped, kept, again));
    raw_munmap(a, 2 * P);
}
