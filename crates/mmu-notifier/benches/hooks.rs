//! Cost of the primary-MMU hooks, with every baseline in the same run:
//! a loop calling nothing, the SRCU read pair alone, start+end with 0, 1 and 8
//! trivial notifiers, and the naive design (a `Mutex<Vec<Arc<dyn ...>>>` walk
//! for start and again for end).
//!
//! `cargo bench -p mmu-notifier --bench hooks`

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, Criterion};
use mmu_notifier::{srcu, Again, Callbacks, Event, MmuNotifier, Range, Subscriptions};

/// A trivial notifier: start and end do nothing observable.
struct Trivial;
impl MmuNotifier for Trivial {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        black_box(r);
        Ok(())
    }
    fn invalidate_range_end(&self, r: &Range) {
        black_box(r);
    }
}

fn hooks(c: &mut Criterion) {
    let range = Range::new(0x1000, 0x2000, Event::Clear).unwrap();
    let mut g = c.benchmark_group("hooks");

    g.bench_function("baseline_nothing", |b| {
        b.iter(|| black_box(black_box(&range).start()))
    });

    // The guard is not passed through `black_box`: that would add a stack
    // round trip the real read side does not have. The atomic store of the
    // lock and of the unlock cannot be optimised away.
    g.bench_function("srcu_read_pair", |b| b.iter(|| drop(srcu::read_lock())));

    for n in [0usize, 1, 8] {
        let mm = Subscriptions::new();
        let handles: Vec<_> = (0..n)
            .map(|_| mm.register(Arc::new(Trivial)).unwrap())
            .collect();
        g.bench_function(format!("start_end_{n}_notifiers"), |b| {
            b.iter(|| mm.invalidate_range_start(black_box(range)).end())
        });
        for h in &handles {
            mm.unregister(h).unwrap();
        }

        let naive: Mutex<Vec<Arc<dyn MmuNotifier>>> = Mutex::new(
            (0..n)
                .map(|_| Arc::new(Trivial) as Arc<dyn MmuNotifier>)
                .collect(),
        );
        g.bench_function(format!("naive_mutex_vec_{n}_notifiers"), |b| {
            b.iter(|| {
                let r = black_box(range);
                for s in naive.lock().unwrap().iter() {
                    let _ = s.invalidate_range_start(&r);
                }
                for s in naive.lock().unwrap().iter() {
                    s.invalidate_range_end(&r);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hooks);
criterion_main!(benches);
