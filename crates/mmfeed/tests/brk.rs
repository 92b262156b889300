//! brk shrinking the heap publishes the pages it frees. A test binary of
//! its own: moving the break under a running allocator is safe only where
//! no other thread allocates from the heap meanwhile, and it is put back
//! exactly where it was.

mod common;

use common::*;
use mmfeed::Kind;

fn raw_brk(to: u64) -> u64 {
    // SAFETY: the raw brk system call; the callers restore the break to the
    // value they found, and no other thread of this binary runs meanwhile.
    unsafe { libc::syscall(libc::SYS_brk, to) as u64 }
}

#[test]
fn brk_shrink_publishes_the_freed_top_of_the_heap() {
    let Some(feed) = feed() else { return };
    let top = raw_brk(0);
    let grown = raw_brk(top + 4 * P);
    assert_eq!(grown, top + 4 * P, "the heap can grow by four pages");
    let got = records_during(&feed, || {
        assert_eq!(raw_brk(top), top);
    });
    // The break is page-rounded by the kernel: the freed pages are those
    // above the rounded old break.
    let from = top.div_ceil(P) * P;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], unmap_start(from, from + 4 * P));
    assert_eq!(got[1], Kind::End);
    // A query (brk(0)) and a growth publish nothing.
    let got = records_during(&feed, || {
        raw_brk(0);
        raw_brk(top + P);
        raw_brk(top);
    });
    assert_eq!(got.len(), 2, "only the last call shrinks: {got:?}");
}
