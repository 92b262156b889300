//! Arbitrary bytes as a scenario file through `mmun run`'s parser and runner:
//! no panic, no hang, errors name their origin, and no scenario may produce a
//! coherence violation (the mirrors are correct; only the input is hostile).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = mmun::scenario::run_text("fuzz", text) {
        assert!(e.starts_with("fuzz"), "errors name their origin: {e}");
        assert!(!e.contains("coherence violation"), "{e}\n{text}");
    }
});
