//! Interval notifiers, each figure with its baseline in the same run:
//!
//! * (a) `read_begin` + `read_retry` uncontended, vs a seqlock read section
//!   (two acquire loads and a compare: the floor) and vs a lock-protected
//!   `read_begin` (Linux's design: spinlock around the seq reads).
//! * (b) `invalidate_range_start` + `end` with N = 1e3..1e6 intervals and
//!   k = 0, 1, 8 overlaps, vs a bare overlap query on `iset` with the same N
//!   (the tree floor), and vs that query plus two lock pairs (what Linux's
//!   design costs at least).
//! * (c) insert + remove at the same N.
//! * (d) two threads: a device-fault loop (read_begin, ~200 ns of work,
//!   read_retry) against an invalidating thread whose ranges never overlap
//!   the reader's interval, then overlap it half the time; the retries are
//!   printed, and the single-thread rate is the baseline.
//!
//! `cargo bench -p mmu-notifier --bench interval` (about 10 minutes; filter
//! with a name, e.g. `-- read_side`).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mmu_notifier::{Event, IntervalNotifier, IntervalOps, Range, Subscriptions, PAGE_SIZE};

/// A trivial interval user: records the sequence, nothing else.
struct Trivial;
impl IntervalOps for Trivial {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, cur_seq: u64) -> bool {
        black_box(r);
        sub.set_seq(cur_seq);
        true
    }
}

/// Interval `i` covers one page at `2 * i` pages: gaps between all of them.
fn interval_start(i: u64) -> u64 {
    2 * i * PAGE_SIZE
}

fn read_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_side");
    let mm = Subscriptions::new();
    let sub = mm.interval_insert(0, PAGE_SIZE, Arc::new(Trivial)).unwrap();
    g.bench_function("read_begin_read_retry", |b| {
        b.iter(|| {
            let seq = sub.read_begin().unwrap();
            black_box(sub.read_retry(black_box(seq)))
        })
    });

    // The floor: a seqlock read section.
    let (sub_seq, mm_seq) = (AtomicU64::new(1), AtomicU64::new(2));
    g.bench_function("seqlock_floor", |b| {
        b.iter(|| {
            let s = sub_seq.load(Ordering::Acquire);
            let busy = s == mm_seq.load(Ordering::Acquire);
            black_box(busy);
            black_box(sub_seq.load(Ordering::Acquire) != black_box(s))
        })
    });

    // Linux's design: read_begin takes the per-mm lock.
    let lock = Mutex::new((1u64, 2u64));
    g.bench_function("locked_read_begin", |b| {
        b.iter(|| {
            let (s, busy) = {
                let st = lock.lock().unwrap();
                (st.0, st.0 == st.1)
            };
            black_box(busy);
            black_box(sub_seq.load(Ordering::Acquire) != black_box(s))
        })
    });
    g.finish();
    sub.remove().unwrap();
}

fn invalidate(c: &mut Criterion) {
    let mut g = c.benchmark_group("invalidate");
    g.sample_size(30);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for n in [1_000u64, 10_000, 100_000, 1_000_000] {
        let mm = Subscriptions::new();
        let ops: Arc<dyn IntervalOps> = Arc::new(Trivial);
        let subs: Vec<_> = (0..n)
            .map(|i| {
                mm.interval_insert(interval_start(i), PAGE_SIZE, ops.clone())
                    .unwrap()
            })
            .collect();
        let mut map = iset::IntervalMap::new();
        for i in 0..n {
            map.insert(interval_start(i)..interval_start(i) + PAGE_SIZE, i);
        }
        let lock = Mutex::new(0u64);
        for k in [0u64, 1, 8] {
            // k = 0: a gap in the middle; otherwise k intervals from the middle.
            let mid = n / 2;
            let (start, end) = if k == 0 {
                (interval_start(mid) + PAGE_SIZE, interval_start(mid + 1))
            } else {
                (interval_start(mid), interval_start(mid + k - 1) + PAGE_SIZE)
            };
            let range = Range::new(start, end, Event::Clear).unwrap();
            let id = format!("n{n}_k{k}");
            g.bench_with_input(BenchmarkId::new("start_end", &id), &range, |b, r| {
                b.iter(|| mm.invalidate_range_start(black_box(*r)).end())
            });
            g.bench_with_input(BenchmarkId::new("iset_query", &id), &range, |b, r| {
                b.iter(|| {
                    for v in map.values(black_box(r.start())..black_box(r.end())) {
                        black_box(v);
                    }
                })
            });
            g.bench_with_input(
                BenchmarkId::new("iset_query_plus_two_lock_pairs", &id),
                &range,
                |b, r| {
                    b.iter(|| {
                        *lock.lock().unwrap() += 1;
                        for v in map.values(black_box(r.start())..black_box(r.end())) {
                            black_box(v);
                        }
                        *lock.lock().unwrap() += 1;
                    })
                },
            );
        }
        // (c) insert + remove at this N, in the middle of the address space.
        let at = interval_start(n / 2) + PAGE_SIZE;
        g.bench_with_input(BenchmarkId::new("insert_remove", n), &at, |b, &at| {
            b.iter(|| {
                let s = mm.interval_insert(at, PAGE_SIZE, ops.clone()).unwrap();
                s.remove().unwrap();
            })
        });
        g.bench_with_input(BenchmarkId::new("iset_insert_remove", n), &at, |b, &at| {
            b.iter(|| {
                map.insert(at..at + PAGE_SIZE, u64::MAX);
                black_box(map.remove(at..at + PAGE_SIZE));
            })
        });
        for s in subs {
            s.remove().unwrap();
        }
    }
    g.finish();
}

/// About 200 ns of "device work".
fn work() {
    let t = Instant::now();
    while t.elapsed() < Duration::from_nanos(200) {
        std::hint::spin_loop();
    }
}

/// One device fault: read_begin, work, read_retry; counts retries.
fn fault(sub: &IntervalNotifier, retries: &AtomicUsize) {
    loop {
        let seq = sub.read_begin().unwrap();
        work();
        if !sub.read_retry(seq) {
            return;
        }
        retries.fetch_add(1, Ordering::Relaxed);
    }
}

fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    let mm = Arc::new(Subscriptions::new());
    let sub = mm.interval_insert(0, PAGE_SIZE, Arc::new(Trivial)).unwrap();
    let retries = Arc::new(AtomicUsize::new(0));

    g.bench_function("fault_alone", |b| b.iter(|| fault(&sub, &retries)));
    retries.store(0, Ordering::Relaxed);

    for (name, overlap_every) in [("never_overlapping", 0u64), ("overlapping_half", 2)] {
        let stop = Arc::new(AtomicBool::new(false));
        let invalidations = Arc::new(AtomicUsize::new(0));
        let inv = {
            let (mm, stop, invalidations) = (mm.clone(), stop.clone(), invalidations.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let start = if overlap_every != 0 && i % overlap_every == 0 {
                        0
                    } else {
                        (4 + i % 64) * PAGE_SIZE
                    };
                    let r = Range::new(start, start + PAGE_SIZE, Event::Clear).unwrap();
                    mm.invalidate_range_start(r).end();
                    invalidations.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        retries.store(0, Ordering::Relaxed);
        let faults = AtomicUsize::new(0);
        g.bench_function(format!("fault_vs_{name}"), |b| {
            b.iter(|| {
                fault(&sub, &retries);
                faults.fetch_add(1, Ordering::Relaxed);
            })
        });
        stop.store(true, Ordering::Relaxed);
        inv.join().unwrap();
        eprintln!(
            "contention/{name}: {} faults, {} retries, {} invalidations",
            faults.load(Ordering::Relaxed),
            retries.load(Ordering::Relaxed),
            invalidations.load(Ordering::Relaxed)
        );
    }
    g.finish();
    sub.remove().unwrap();
}

criterion_group!(benches, read_side, invalidate, contention);
criterion_main!(benches);
