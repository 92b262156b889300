//! Races between primary operations found by `mmun stress`, kept as tests
//! that fail when their fix is reverted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use softmm::{MapKind, Prot};

/// KSM must hold a reference on its stable page for the whole merge pass:
/// a concurrent DONTNEED can drop the page's last mapping in the meantime,
/// and merging into a freed (and reused) frame corrupts the accounting.
#[test]
fn ksm_merge_racing_dontneed_keeps_frame_accounting_exact() {
    let (phys, mm) = machine(4096);
    const N: u64 = 32;
    let a = mm.mmap(N * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let churn = {
        let (mm, stop, progress) = (mm.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pg = a + (i % N) * P;
                if i % 3 == 0 {
                    mm.madvise_dontneed(pg, P).unwrap();
                } else {
                    mm.write(pg, &[(i % 2) as u8 + 1]).unwrap();
                }
                i += 1;
                progress.store(i, Ordering::Relaxed);
            }
        })
    };
    // Both sides make progress, whatever the scheduler does.
    let mut merges = 0;
    while (merges < 5000 || progress.load(Ordering::Relaxed) < 50_000) && !churn.is_finished() {
        mm.ksm_merge(a, N * P).unwrap();
        merges += 1;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert_eq!(phys.stats().underflows, 0, "a frame was put twice");
    drop(mm);
    let s = phys.stats();
    assert_eq!((s.in_use, s.underflows), (1, 0), "{s:?}");
}
