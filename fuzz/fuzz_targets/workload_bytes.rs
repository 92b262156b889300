//! Bytes as a single-threaded workload on one address space with the four
//! mirrors attached: each 9-byte chunk picks an operation of the stress mix
//! (first byte) and seeds its arguments (the other eight), so libFuzzer's
//! mutations steer the operation sequence directly. After the sequence and
//! after teardown: no oracle violation, no violation reported by a mirror, no
//! leaked frame or swap slot, no double free.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mmun::rng::Rng;
use mmun::stress::{self, Fail, Kind};
use mmun::trace::Monitor;
use mmun::world;
use softmm::PhysMem;

fuzz_target!(|data: &[u8]| {
    let phys = PhysMem::new(1024);
    let monitor = Arc::new(Monitor::default());
    let space = world::Space {
        // Few pages: consecutive operations hit the same pages.
        hot: Some(4),
        ..world::space(&phys, &monitor, 0, true)
    };
    for chunk in data.chunks(9).take(256) {
        let kind = Kind::ALL[usize::from(chunk[0]) % Kind::ALL.len()];
        let mut seed = [0u8; 8];
        seed[..chunk.len() - 1].copy_from_slice(&chunk[1..]);
        let mut rng = Rng::new(u64::from_le_bytes(seed));
        if let Err(Fail::Violation(msg)) = stress::exec(kind, &space, &mut rng) {
            panic!("coherence violation in {}: {msg}", kind.name());
        }
    }
    let violations = phys.oracle().violations();
    assert!(violations.is_empty(), "{}", violations[0]);
    drop(space);
    let leaks = stress::leaks_after_teardown(&phys);
    assert!(leaks.is_empty(), "{leaks:?}");
});
