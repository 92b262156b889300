//! The `invalidate_range_start` contract: a secondary must stop using its
//! mappings of the range before `invalidate_range_start` returns. Dropping
//! them only in `invalidate_range_end` is not enough: the primary may free
//! pages (full mmu_gather batches) or replace them (COW, swap-out) before it
//! calls `end`. A mirror that keeps using its mappings until `end` (here: it
//! uses each one at `end`, then drops it) is caught by the oracle; the same
//! mirror dropping in `start` is not.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use mmu_notifier::{Again, Callbacks, MmuNotifier, Range};
use softmm::{FrameRef, MmGrab, GATHER_BATCH};

struct Mirror {
    mm: MmGrab,
    pt: Mutex<HashMap<u64, FrameRef>>,
    drop_in_start: bool,
}

impl Mirror {
    fn new(mm: &softmm::Mm, drop_in_start: bool) -> Arc<Mirror> {
        let m = Arc::new(Mirror {
            mm: mm.grab(),
            pt: Mutex::new(HashMap::new()),
            drop_in_start,
        });
        mm.subscriptions().register(m.clone()).unwrap();
        m
    }

    fn map(&self, mm: &softmm::Mm, start: u64, pages: u64) {
        let mut pt = self.pt.lock().unwrap();
        for i in 0..pages {
            pt.insert(start + i * P, frame_at(mm, start + i * P));
        }
    }

    fn drop_range(&self, r: &Range) {
        self.pt
            .lock()
            .unwrap()
            .retain(|&a, _| !(r.start() <= a && a < r.end()));
    }
}

impl MmuNotifier for Mirror {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }

    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        if self.drop_in_start {
            self.drop_range(r);
        }
        Ok(())
    }

    fn invalidate_range_end(&self, r: &Range) {
        // A device access racing the invalidation, at the last moment the
        // old wording allowed ("drop at the latest before end returns").
        let used: Vec<_> = self
            .pt
            .lock()
            .unwrap()
            .iter()
            .filter(|(&a, _)| r.start() <= a && a < r.end())
            .map(|(&a, &f)| (a, f))
            .collect();
        for (a, f) in used {
            let _ = self.mm.phys().oracle().check_access(&self.mm, a, f, false);
        }
        self.drop_range(r);
    }
}

/// Violations a mirror causes across `change`, with its mappings of
/// `pages` pages from the address `setup` returns.
fn violations(
    drop_in_start: bool,
    pages: u64,
    setup: impl Fn(&softmm::Mm) -> u64,
    change: impl Fn(&softmm::Mm, u64),
) -> u64 {
    let (phys, mm) = machine(1024);
    let a = setup(&mm);
    let mirror = Mirror::new(&mm, drop_in_start);
    mirror.map(&mm, a, pages);
    change(&mm, a);
    phys.oracle().violation_count()
}

#[test]
fn dropping_only_at_end_uses_pages_a_munmap_already_freed() {
    let pages = 2 * GATHER_BATCH as u64;
    let run = |eager| {
        violations(
            eager,
            pages,
            |mm| populated(mm, pages, 1),
            |mm, a| mm.munmap(a, pages * P).unwrap(),
        )
    };
    assert!(
        run(false) >= GATHER_BATCH as u64,
        "full batches are freed before end"
    );
    assert_eq!(run(true), 0);
}

#[test]
fn dropping_only_at_end_uses_the_page_a_cow_fault_replaced() {
    let run = |eager| {
        let (phys, mm) = machine(64);
        let a = populated(&mm, 1, 1);
        let child = mm.fork().unwrap(); // the page is now shared, read-only
        let mirror = Mirror::new(&mm, eager);
        mirror.map(&mm, a, 1);
        mm.write(a, &[9]).unwrap(); // COW: the parent gets a new page
        drop(child);
        phys.oracle().violation_count()
    };
    assert!(run(false) >= 1);
    assert_eq!(run(true), 0);
}

#[test]
fn dropping_only_at_end_uses_a_page_swapped_out() {
    let run = |eager| {
        violations(
            eager,
            1,
            |mm| populated(mm, 1, 1),
            |mm, a| assert_eq!(mm.swap_out(a, P).unwrap(), 1),
        )
    };
    assert!(run(false) >= 1);
    assert_eq!(run(true), 0);
}
