//! ProcessMm and RegCache<ProcessMm> on real memory, with real syscalls.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mmu_notifier::{Event, IntervalNotifier, IntervalOps, Range};
use regcache::Access;
use rustix::mm::Advice;
use uffd::UffdError;

/// Records every invalidation it sees.
#[derive(Default)]
struct Log(Mutex<Vec<(Event, u64, u64)>>);

impl IntervalOps for Log {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
        sub.set_seq(seq);
        self.0.lock().unwrap().push((r.event(), r.start(), r.end()));
        true
    }
}

impl Log {
    fn take(&self) -> Vec<(Event, u64, u64)> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

macro_rules! mm_or_skip {
    () => {
        match process_mm() {
            Some(mm) => mm,
            None => return,
        }
    };
}

#[test]
fn munmap_whole_and_partial_unmap_events_reach_the_notifier() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(8);
    let log = Arc::new(Log::default());
    let sub = mm.interval_insert(a, 8 * P, log.clone()).unwrap();
    unmap(a + 2 * P, 1);
    mm.flush().unwrap();
    assert_eq!(log.take(), vec![(Event::Unmap, a + 2 * P, a + 3 * P)]);
    unmap(a, 8);
    mm.flush().unwrap();
    // The remaining VMAs of the range, one event each.
    let ev = log.take();
    assert!(!ev.is_empty() && ev.iter().all(|e| e.0 == Event::Unmap));
    assert_eq!(ev.first().unwrap().1, a);
    assert_eq!(ev.last().unwrap().2, a + 8 * P);
    sub.remove().unwrap();
}

#[test]
fn madvise_dontneed_and_free_are_clear_events() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(4);
    write_word(a, 7);
    let log = Arc::new(Log::default());
    let sub = mm.interval_insert(a, 4 * P, log.clone()).unwrap();
    advise(a, 1, Advice::LinuxDontNeed);
    assert_eq!(read_word(a), 0);
    advise(a + P, 2, Advice::LinuxFree);
    mm.flush().unwrap();
    assert_eq!(
        log.take(),
        vec![(Event::Clear, a, a + P), (Event::Clear, a + P, a + 3 * P)]
    );
    sub.remove().unwrap();
    unmap(a, 4);
}

#[test]
fn mremap_move_unmaps_the_old_range_and_grow_in_place_keeps_it() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let cache = common::cache(&mm, 64);
    // Grow in place: reserve 4 pages, give back the top 2, grow into them.
    let a = map(4);
    unmap(a + 2 * P, 2);
    let r = cache.get(a, 2 * P, Access::READ_WRITE).unwrap();
    assert_eq!(remap(a, 2, 4, false).unwrap(), a);
    assert!(
        cache.get(a, 2 * P, Access::READ_WRITE).unwrap().id() == r.id(),
        "grow in place changes no page"
    );
    // Move: a mapping right above forces the grow to move.
    let (b, guard) = two_pages_below_a_guard();
    let rb = cache.get(b, 2 * P, Access::READ_WRITE).unwrap();
    let nb = remap(b, 2, 8, true).unwrap();
    assert_ne!(nb, b);
    mm.flush().unwrap();
    assert!(
        !rb.is_valid(),
        "a lookup after mremap returned sees the move"
    );
    let nr = cache.get(nb, 2 * P, Access::READ_WRITE).unwrap();
    assert_ne!(nr.id(), rb.id());
    assert!(mm.stats().remaps.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop(cache);
    unmap(nb, 8);
    unmap(a, 4);
    unmap(guard, 1);
}

/// Two read-write pages and, right above them, a read-only page (a VMA of
/// its own): all three ours. (A `MAP_FIXED` page above a fresh mapping
/// replaced whatever the kernel had put there, once the fork sentinel.)
fn two_pages_below_a_guard() -> (u64, u64) {
    let b = map(3);
    let guard = b + 2 * P;
    // SAFETY: the test's own page; no reference into it exists.
    unsafe { rustix::mm::mprotect(guard as *mut _, P as usize, rustix::mm::MprotectFlags::READ) }
        .expect("mprotect");
    (b, guard)
}

#[test]
fn map_fixed_over_a_registration_invalidates_it() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let cache = common::cache(&mm, 64);
    let a = map(4);
    let r = cache.get(a, 4 * P, Access::READ_WRITE).unwrap();
    map_fixed(a + P, 1);
    assert!(cache.get(a, P, Access::READ_WRITE).unwrap().id() != r.id());
    assert!(!r.is_valid());
    // The new mapping is watched again by the new registration.
    let r2 = cache.get(a + P, P, Access::READ_WRITE).unwrap();
    unmap(a + P, 1);
    assert!(cache.get(a, P, Access::READ).is_ok());
    assert!(!r2.is_valid());
    drop(cache);
    unmap(a, 4);
}

#[test]
fn an_unmap_by_raw_syscall_is_seen() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let cache = common::cache(&mm, 64);
    let a = map(2);
    let r = cache.get(a, 2 * P, Access::READ_WRITE).unwrap();
    // SAFETY: unmapping the test's own mapping, bypassing libc's munmap
    // wrapper (what UCX's hooks miss).
    let rc = unsafe { libc::syscall(libc::SYS_munmap, a as usize, (2 * P) as usize) };
    assert_eq!(rc, 0);
    mm.flush().unwrap();
    assert!(!r.is_valid());
    // Another test's mmap may have reused the address: then the lookup
    // registers that new mapping.
    if let Ok(again) = cache.get(a, P, Access::READ) {
        assert_ne!(again.id(), r.id());
    }
}

#[test]
fn lookups_after_each_change_never_return_the_old_registration() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let cache = common::cache(&mm, 64);
    let a = map(4);
    for step in 0..4 {
        let r = cache.get(a, 4 * P, Access::READ_WRITE).unwrap();
        assert!(
            cache.get(a, 4 * P, Access::READ_WRITE).unwrap().id() == r.id(),
            "a hit"
        );
        match step {
            0 => advise(a + P, 1, Advice::LinuxDontNeed),
            1 => advise(a, 4, Advice::LinuxFree),
            2 => map_fixed(a + 3 * P, 1),
            _ => {
                unmap(a, 4);
                map_fixed(a, 4);
            }
        }
        let again = cache.get(a, 4 * P, Access::READ_WRITE).unwrap();
        assert_ne!(again.id(), r.id(), "step {step}");
        assert!(!r.is_valid());
    }
    let s = cache.stats();
    assert_eq!(s.invalidated.load(std::sync::atomic::Ordering::Relaxed), 4);
    drop(cache);
    unmap(a, 4);
}

#[test]
fn watched_pages_fault_in_without_the_monitor() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(16);
    let w = mm.watch(a, 16 * P).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // First touches, reads and writes, after DONTNEED, and a kernel
        // write (read(2) from a pipe) into a never-touched page.
        assert_eq!(read_word(a), 0);
        write_word(a + P, 5);
        advise(a + P, 1, Advice::LinuxDontNeed);
        write_word(a + P, 6);
        let (r, wr) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&wr, &[9u8; 64]).unwrap();
        // SAFETY: the page at a + 8P is part of the test's live mapping
        // and nothing else references it.
        let buf = unsafe { std::slice::from_raw_parts_mut((a + 8 * P) as *mut u8, 64) };
        assert_eq!(rustix::io::read(&r, buf).unwrap(), 64);
        tx.send(read_word(a + P)).unwrap();
    });
    let v = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a first touch of a watched page hung");
    assert_eq!(v, 6);
    assert_eq!(
        mm.stats().faults.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(w);
    unmap(a, 16);
}

#[test]
fn unwatched_ranges_are_unregistered_and_produce_no_events() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(8);
    let w1 = mm.watch(a, 4 * P).unwrap();
    let w2 = mm.watch(a + 2 * P, 4 * P).unwrap();
    assert!(mm.watched_segments() > 0);
    drop(w1);
    drop(w2);
    assert_eq!(mm.watched_segments(), 0);
    let before = mm.stats().unmaps.load(std::sync::atomic::Ordering::Relaxed);
    unmap(a, 8);
    mm.flush().unwrap();
    assert_eq!(
        mm.stats().unmaps.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let _serial = serial();
    let mm = mm_or_skip!();
    assert!(matches!(
        mm.watch(0x1000, 0),
        Err(UffdError::BadRange { .. })
    ));
    assert!(matches!(
        mm.watch(u64::MAX - 0x1000, 0x2000),
        Err(UffdError::BadRange { .. })
    ));
    // A regular-file mapping cannot be registered; the message says why.
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    // SAFETY: a fresh private read-only mapping of a file we hold open.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            P as usize,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::PRIVATE,
            &f,
            0,
        )
    }
    .unwrap() as u64;
    let e = mm.watch(p, P).unwrap_err();
    assert!(e.to_string().contains("regular files"), "{e}");
    unmap(p, 1);
    // An unmapped range: registration and pinning fail, nothing is left.
    let a = map(1);
    unmap(a, 1);
    assert!(mm.watch(a, P).is_err());
    assert!(matches!(
        mm.pin(a, P, false),
        Err(UffdError::Populate { .. })
    ));
    assert_eq!(mm.watched_segments(), 0);
    // A read-only mapping cannot be pinned for writing.
    let ro = map(1);
    // SAFETY: changing the protection of the test's own mapping.
    unsafe { rustix::mm::mprotect(ro as *mut _, P as usize, rustix::mm::MprotectFlags::READ) }
        .unwrap();
    assert!(mm.pin(ro, P, false).is_ok());
    assert!(mm.pin(ro, P, true).is_err());
    unmap(ro, 1);
}

#[test]
fn shutdown_releases_notifiers_and_later_calls_fail() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(2);
    let log = Arc::new(Log::default());
    let sub = mm.interval_insert(a, 2 * P, log.clone()).unwrap();
    mm.shutdown();
    assert_eq!(log.take(), vec![(Event::Release, 0, u64::MAX)]);
    assert!(!mm.is_live());
    assert!(matches!(mm.flush(), Err(UffdError::Dead(_))));
    assert!(matches!(mm.watch(a, P), Err(UffdError::Dead(_))));
    // munmap no longer waits for a monitor.
    unmap(a, 2);
    sub.remove().unwrap();
    mm.shutdown();
}

#[test]
fn a_panicking_callback_does_not_stop_the_monitor() {
    struct Boom;
    impl IntervalOps for Boom {
        fn invalidate(&self, _: &IntervalNotifier, _: &Range, _: u64) -> bool {
            panic!("boom");
        }
    }
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(2);
    let boom = mm.interval_insert(a, P, Arc::new(Boom)).unwrap();
    let log = Arc::new(Log::default());
    let sub = mm.interval_insert(a + P, P, log.clone()).unwrap();
    unmap(a, 1);
    unmap(a + P, 1);
    mm.flush().unwrap();
    assert_eq!(log.take(), vec![(Event::Unmap, a + P, a + 2 * P)]);
    assert!(mm.is_live());
    assert!(
        mm.subscriptions()
            .diagnostics()
            .count(mmu_notifier::Warning::CallbackPanicked)
            >= 1
    );
    let _ = boom.remove();
    sub.remove().unwrap();
}

/// A callback that takes a lock an application thread holds.
struct Blocks(Arc<Mutex<()>>);

impl IntervalOps for Blocks {
    fn invalidate(&self, sub: &IntervalNotifier, _: &Range, seq: u64) -> bool {
        drop(self.0.lock().unwrap());
        sub.set_seq(seq);
        true
    }
}

/// glibc's `free` trims an arena (madvise, or munmap) with the arena's lock
/// held, and a callback freeing memory of that arena waits for that lock.
/// Here a plain mutex stands for the arena lock: a callback waits for it
/// while its holder unmaps other watched memory. The kernel makes the
/// holder's munmap wait until its event is *read*; a monitor whose reader
/// waits for the callback would never read it (a deadlock, seen with a
/// registration cache under threads calling malloc/free). The reader must
/// keep reading while the handler is blocked.
#[test]
fn a_blocked_callback_does_not_stop_the_monitor_reading() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let arena = Arc::new(Mutex::new(()));
    let (a, b) = (map(1), map(1));
    let sa = mm
        .interval_insert(a, P, Arc::new(Blocks(arena.clone())))
        .unwrap();
    let sb = mm.interval_insert(b, P, Arc::new(Log::default())).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (mm2, arena2) = (mm.clone(), arena.clone());
    std::thread::spawn(move || {
        let held = arena2.lock().unwrap();
        // The handler runs a's callback, which waits for `held`...
        let first = std::thread::spawn(move || unmap(a, 1));
        while mm2
            .stats()
            .unmaps
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        // ...while the holder unmaps other watched memory.
        unmap(b, 1);
        drop(held);
        first.join().unwrap();
        tx.send(()).unwrap();
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        // Nothing in the process can break this cycle (a thread in munmap
        // waits for the reader, the reader for the handler, the handler for
        // the lock the first thread holds), and unwinding would wait on it
        // too (removing the notifiers waits for the blocked callback): end
        // the test binary with the failure.
        eprintln!(
            "deadlock: a munmap waited for the monitor while the monitor waited for a callback"
        );
        std::process::exit(101);
    }
    mm.flush().unwrap();
    sa.remove().unwrap();
    sb.remove().unwrap();
}

/// Dropping the handle of an interval notifier takes the notifier out of
/// the tree (it used to stop the events but stay in the tree).
#[test]
fn dropping_a_process_interval_removes_its_notifier() {
    let _serial = serial();
    let mm = mm_or_skip!();
    let a = map(1);
    let log = Arc::new(Log::default());
    let sub = mm.interval_insert(a, P, log.clone()).unwrap();
    let probe = || {
        mm.primary_subscriptions()
            .invalidate_range_start(Range::new(a, a + P, Event::Clear).unwrap())
            .end();
        log.take().len()
    };
    assert_eq!(probe(), 1, "inserted");
    drop(sub);
    assert_eq!(probe(), 0, "dropped, so removed");
    assert_eq!(mm.watched_segments(), 0, "and no longer watched");
    unmap(a, 1);
}
