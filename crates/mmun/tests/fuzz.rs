//! Fuzzing with proptest, the part that runs in CI (coverage-guided runs with
//! cargo-fuzz are in `fuzz/`, see the README): the scenario parser and runner
//! on generated scenario text, and random single-threaded workloads on softmm
//! with all four mirrors. Neither may panic, hang or produce a coherence
//! violation; bad input must come back as an error. CI runs a few cases; for
//! a long run: `PROPTEST_CASES=20000 cargo test --release -p mmun --test fuzz`.

use mmun::scenario::run_text;
use mmun::stress::{self, Settings};
use proptest::prelude::*;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

const OPS: &[&str] = &[
    "mm",
    "fork",
    "exit",
    "attach",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "write",
    "read",
    "ksm",
    "migrate",
    "swap_out",
    "age",
    "writeback",
    "soft_dirty",
    "oom_reap",
    "kvm_fault",
    "kvm_read",
    "kvm_write",
    "device_read",
    "device_write",
    "device_migrate",
    "device_migrate_back",
    "device_exclusive",
    "device_snapshot",
    "tlb_access",
    "reg_get",
    "reg_check",
    "check",
    "join",
    "bogus",
];

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..40).prop_map(|n| n.to_string()),
        Just("0x10000000".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-1".to_string()),
        Just("4096".to_string()),
    ]
}

fn field() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("\"buf\""),
        Just("\"b2\""),
        Just("\"main\""),
        Just("\"c\"")
    ];
    prop_oneof![
        number().prop_map(|n| format!("pages = {n}")),
        number().prop_map(|n| format!("new_pages = {n}")),
        number().prop_map(|n| format!("addr = {n}")),
        (name.clone(), 0u64..70)
            .prop_map(|(n, k)| format!("addr = \"{}+{k}\"", n.trim_matches('"'))),
        name.clone().prop_map(|n| format!("addr = {n}")),
        name.clone().prop_map(|n| format!("name = {n}")),
        name.clone().prop_map(|n| format!("mm = {n}")),
        name.clone().prop_map(|n| format!("reg = {n}")),
        number().prop_map(|n| format!("to = {n}")),
        prop_oneof![Just("none"), Just("r"), Just("rw"), Just("x")]
            .prop_map(|p| format!("prot = \"{p}\"")),
        prop_oneof![Just("anon"), Just("shared"), Just("file"), Just("?")]
            .prop_map(|k| format!("kind = \"{k}\"")),
        prop_oneof![Just("dontneed"), Just("free"), Just("nope")]
            .prop_map(|a| format!("advice = \"{a}\"")),
        (0u32..300).prop_map(|v| format!("value = {v}")),
        any::<bool>().prop_map(|w| format!("write = {w}")),
        prop_oneof![Just("any"), Just("NotMapped"), Just("EFAULT")]
            .prop_map(|e| format!("expect_error = \"{e}\"")),
        Just("expect = \"fault\"".to_string()),
        number().prop_map(|n| format!("frames = {n}")),
        Just("garbage here".to_string()),
    ]
}

fn step() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(OPS),
        0u64..12,
        number(),
        proptest::collection::vec(field(), 0..4),
    )
        .prop_map(|(op, k, pages, fields)| {
            // Most steps get a valid address and a page count, so they reach
            // the operation itself; the extra fields may override or break them.
            let mut s = format!("[[step]]\nop = \"{op}\"\naddr = \"buf+{k}\"\npages = {pages}\n");
            for f in fields {
                s.push_str(&f);
                s.push('\n');
            }
            s
        })
}

fn scenario() -> impl Strategy<Value = String> {
    proptest::collection::vec(step(), 0..14).prop_map(|steps| {
        // Usually start with an address space and a mapping so later steps
        // get past name resolution.
        let mut s = String::from("[[step]]\nop = \"mm\"\nname = \"main\"\n[[step]]\nop = \"mmap\"\nname = \"buf\"\npages = 8\n");
        for st in steps {
            s.push_str(&st);
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn scenario_runner_survives_generated_scenarios(text in scenario()) {
        match run_text("fuzz", &text) {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(e.starts_with("fuzz"), "errors name their origin: {e}");
                prop_assert!(!e.contains("coherence violation"), "{e}\n{text}");
            }
        }
    }

    #[test]
    fn scenario_parser_survives_arbitrary_text(text in "\\PC{0,300}") {
        let _ = run_text("fuzz", &text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_with_mirrors_stay_coherent(seed in any::<u64>(), ops in 200u64..3000) {
        let report = stress::run(&Settings {
            seconds: None,
            ops: Some(ops),
            threads: 1,
            seed,
            spaces: 1,
            frames: 4096,
            progress: false,
            skip: Vec::new(),
        });
        prop_assert_eq!(report.violations, 0, "{:?}", report.first);
        prop_assert!(report.leaks.is_empty(), "{:?}", report.leaks);
        prop_assert_eq!(report.sleeps_in_non_blockable, 0);
    }
}

/// Found by the generator: page counts and address offsets that overflow
/// were a panic (debug builds) instead of an error.
#[test]
fn overflowing_page_counts_and_offsets_are_errors() {
    let base = "[[step]]\nop = \"mm\"\nname = \"main\"\n[[step]]\nop = \"mmap\"\nname = \"buf\"\npages = 8\n";
    for step in [
        "[[step]]\nop = \"munmap\"\naddr = \"buf\"\npages = 9223372036854775807\n",
        "[[step]]\nop = \"mremap\"\naddr = \"buf\"\npages = 1\nnew_pages = 9223372036854775807\n",
        "[[step]]\nop = \"write\"\naddr = \"buf+9223372036854775807\"\n",
        "[[step]]\nop = \"attach\"\n[[step]]\nop = \"device_write\"\naddr = \"buf\"\npages = 9223372036854775807\n",
    ] {
        let text = format!("{base}{step}");
        let err = run_text("o", &text).unwrap_err();
        assert!(err.starts_with("o:"), "{err}");
    }
}
