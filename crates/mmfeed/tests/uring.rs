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

/// The records of io_uring requests (token owners) published while `f` ran
/// that concern `[lo, hi)`: STARTs inside it and the ENDs of their tokens
/// (other tests of this binary submit requests of their own meanwhile).
fn request_records_during(feed: &Feed, lo: u64, hi: u64, f: impl FnOnce()) -> Vec<Record> {
    let from = feed.head();
    f();
    let to = feed.head();
    let mut mine = Vec::new();
    let mut out = Vec::new();
    for r in (from..to).filter_map(|i| feed.record(i)) {
        if r.tid & TOKEN_BIT == 0 {
            continue;
        }
        match r.kind {
            Kind::Start { start, end, .. } if lo <= start && end <= hi => {
                mine.push(r.tid);
                out.push(r);
            }
            Kind::End if mine.contains(&r.tid) => out.push(r),
            _ => {}
        }
    }
    out
}

#[test]
fn an_io_uring_madvise_publishes_start_when_queued_and_end_when_complete() {
    let Some(feed) = feed() else { return };
    let a = map(4);
    for advice in [libc::MADV_DONTNEED, libc::MADV_FREE] {
        let mut completions = Vec::new();
        let got = request_records_during(&feed, a, a + 4 * P, || {
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
    let got = request_records_during(&feed, a, a + 4 * P, || {
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

/// The registration race through io_uring: thread M tags its page afresh,
/// looks it up, and drops the page with an io_uring MADVISE_DONTNEED (run
/// by an io-wq worker, between the START published when it is queued and
/// the END published when it completes); two threads register that page
/// all the while. A registration that read the old tag while the madvise
/// was in flight must never be committed: M's next lookup would hit it.
#[test]
fn a_registration_racing_an_io_uring_madvise_in_flight_is_never_committed_stale() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;
    let Some(mm) = feed_mm() else { return };
    let cache = tag_cache(mm);
    let until = Instant::now() + seconds();
    let page = map(1);
    let stop = Arc::new(AtomicBool::new(false));
    let registrars: Vec<_> = (0..2)
        .map(|_| {
            let (cache, stop) = (cache.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = cache.get(page, P, Access::READ);
                }
            })
        })
        .collect();
    let mut ring = io_uring::IoUring::new(8).expect("io_uring_setup");
    let (mut lookups, mut stale, mut tag) = (0u64, 0u64, 0u64);
    while Instant::now() < until {
        tag += 1;
        write_tag(page, tag);
        if let Ok(e) = cache.get(page, P, Access::READ) {
            lookups += 1;
            if *e.handle() != tag {
                stale += 1;
            }
        }
        let madvise = io_uring::opcode::Madvise::new(
            page as *const libc::c_void,
            P as _,
            libc::MADV_DONTNEED,
        )
        .build();
        // SAFETY: the madvise names the test's own page, read and written
        // only through write_tag/read_tag (no reference into it).
        unsafe { ring.submission().push(&madvise).expect("room") };
        ring.submit_and_wait(1).expect("wait");
        let res = ring.completion().next().expect("a completion").result();
        assert_eq!(res, 0, "the madvise");
    }
    stop.store(true, Ordering::Relaxed);
    for r in registrars {
        r.join().unwrap();
    }
    let retries = cache.stats().retries.load(Ordering::Relaxed);
    eprintln!("io_uring registration race: {lookups} lookups, {stale} stale, {retries} registrations retried");
    assert!(lookups > 200, "the race ran ({lookups} lookups)");
    assert_eq!(stale, 0, "{stale} stale registrations in {lookups} lookups");
    drop(cache);
    raw_munmap(page, P);
}
