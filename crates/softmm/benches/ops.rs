//! Notifier overhead of the software MMU's operations: munmap, mprotect and
//! fault storms with 0 and with 4 notifiers attached, side by side in one
//! run (compare `…/0` with `…/4` of the same group for the ratio).
//!
//! The 4 notifiers are one of each kind a real address space carries: two
//! classic start/end notifiers (a KVM-style counter), an interval notifier
//! over the whole address space (an HMM mirror) and a secondary-TLB notifier.
//!
//! `cargo bench -p softmm --bench ops`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mmu_notifier::{Again, Callbacks, IntervalNotifier, IntervalOps, MmuNotifier, Range};
use softmm::{MapKind, Mm, PhysMem, Prot, PAGE_SIZE, TASK_SIZE};

const PAGES: u64 = 16;

#[derive(Default)]
struct Counter(AtomicU64);
impl MmuNotifier for Counter {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }
    fn invalidate_range_start(&self, _r: &Range) -> Result<(), Again> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn invalidate_range_end(&self, _r: &Range) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Tlb(AtomicU64);
impl MmuNotifier for Tlb {
    fn callbacks(&self) -> Callbacks {
        Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS
    }
    fn arch_invalidate_secondary_tlbs(&self, _s: u64, _e: u64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

struct Mirror;
impl IntervalOps for Mirror {
    fn invalidate(&self, sub: &IntervalNotifier, _r: &Range, seq: u64) -> bool {
        sub.set_seq(seq);
        true
    }
}

fn setup(notifiers: usize) -> (Arc<PhysMem>, Mm, Option<IntervalNotifier>) {
    let phys = PhysMem::new(4096);
    let mm = Mm::new(&phys);
    let mut isub = None;
    if notifiers == 4 {
        let s = mm.subscriptions();
        s.register(Arc::new(Counter::default())).unwrap();
        s.register(Arc::new(Counter::default())).unwrap();
        s.register(Arc::new(Tlb(AtomicU64::new(0)))).unwrap();
        isub = Some(s.interval_insert(0, TASK_SIZE, Arc::new(Mirror)).unwrap());
    }
    (phys, mm, isub)
}

fn populate(mm: &Mm, a: u64) {
    for i in 0..PAGES {
        mm.write(a + i * PAGE_SIZE, &[1]).unwrap();
    }
}

fn storms(c: &mut Criterion) {
    let len = PAGES * PAGE_SIZE;
    let mut g = c.benchmark_group("munmap_storm");
    for n in [0, 4] {
        let (_phys, mm, _isub) = setup(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let a = mm.mmap(len, Prot::RW, MapKind::AnonPrivate).unwrap();
                populate(&mm, a);
                mm.munmap(black_box(a), len).unwrap();
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("mprotect_storm");
    for n in [0, 4] {
        let (_phys, mm, _isub) = setup(n);
        let a = mm.mmap(len, Prot::RW, MapKind::AnonPrivate).unwrap();
        populate(&mm, a);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                mm.mprotect(black_box(a), len, Prot::READ).unwrap();
                mm.mprotect(a, len, Prot::RW).unwrap();
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("fault_storm");
    for n in [0, 4] {
        let (_phys, mm, _isub) = setup(n);
        let a = mm.mmap(len, Prot::RW, MapKind::AnonPrivate).unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                mm.madvise_dontneed(black_box(a), len).unwrap();
                populate(&mm, a);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, storms);
criterion_main!(benches);
