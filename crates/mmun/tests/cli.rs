//! The `mmun` binary end to end: scenarios, errors with file:line, stress,
//! determinism, traces.

use std::path::{Path, PathBuf};
use std::process::Command;

fn mmun() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mmun"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmun-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn shipped_scenarios_pass() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6);
    let out = mmun().arg("run").args(&files).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} passed, 0 failed", files.len())),
        "{stdout}"
    );
}

fn run_text(name: &str, text: &str) -> (bool, String) {
    let p = tmp(name);
    std::fs::write(&p, text).unwrap();
    let out = mmun().arg("run").arg(&p).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn bad_scenarios_are_reported_with_file_and_line() {
    let (ok, out) = run_text(
        "unknown_field.toml",
        "[[step]]\nop = \"mm\"\nname = \"a\"\n\n[[step]]\nop = \"mmap\"\npagez = 3\n",
    );
    assert!(!ok);
    assert!(out.contains("unknown_field.toml:7"), "{out}");
    assert!(out.contains("pagez"), "{out}");

    let (ok, out) = run_text(
        "unknown_op.toml",
        "[[step]]\nop = \"mm\"\nname = \"a\"\n\n[[step]]\nop = \"frobnicate\"\n",
    );
    assert!(!ok);
    assert!(
        out.contains("unknown_op.toml:5") && out.contains("unknown op"),
        "{out}"
    );

    let (ok, out) = run_text(
        "unknown_name.toml",
        "[[step]]\nop = \"mm\"\nname = \"main\"\n\n[[step]]\nop = \"write\"\naddr = \"nowhere\"\n",
    );
    assert!(!ok);
    assert!(
        out.contains("unknown_name.toml:5") && out.contains("unknown mapping name"),
        "{out}"
    );

    let (ok, out) = run_text("syntax.toml", "[[step]\nop = 1\n");
    assert!(!ok);
    assert!(out.contains("syntax.toml:1"), "{out}");

    // A failed expectation names the step and what differed.
    let (ok, out) = run_text(
        "expect.toml",
        "[[step]]\nop = \"mm\"\nname = \"main\"\n[[step]]\nop = \"mmap\"\nname = \"b\"\n[[step]]\nop = \"read\"\naddr = \"b\"\nexpect_value = 3\n",
    );
    assert!(!ok);
    assert!(
        out.contains("expect.toml:7") && out.contains("expected value 3, got 0"),
        "{out}"
    );

    // "This access must fail": an access that succeeds is a failure.
    let (ok, out) = run_text(
        "mustfail.toml",
        "[[step]]\nop = \"mm\"\nname = \"main\"\n[[step]]\nop = \"mmap\"\nname = \"b\"\n[[step]]\nop = \"read\"\naddr = \"b\"\nexpect_error = \"NotMapped\"\n",
    );
    assert!(!ok);
    assert!(
        out.contains("expected error NotMapped, the operation succeeded"),
        "{out}"
    );
}

fn op_table(stdout: &str) -> String {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("operation"))
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn stress_passes_and_one_thread_runs_are_reproducible() {
    let out = mmun()
        .args(["stress", "--ops", "20000", "--threads", "2", "--seed", "11"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("OK: no coherence violation, no leak"), "{s}");
    let violations = s.lines().find(|l| l.starts_with("violations")).unwrap();
    assert!(violations.ends_with(" 0"), "{violations}");
    // The default mix runs huge pages: THPs faulted in and split by the
    // other operations, hugetlb pages.
    let figure = |name: &str| -> u64 {
        let l = s.lines().find(|l| l.starts_with(name)).unwrap();
        l.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert!(figure("huge pages allocated") > 0, "{s}");
    assert!(figure("PMD splits") > 0, "{s}");

    let run = || {
        let o = mmun()
            .args(["stress", "--ops", "5000", "--threads", "1", "--seed", "7"])
            .output()
            .unwrap();
        assert!(o.status.success());
        op_table(&String::from_utf8_lossy(&o.stdout))
    };
    let (a, b) = (run(), run());
    assert!(a.lines().count() > 20, "{a}");
    assert_eq!(
        a, b,
        "the same seed on one thread issues the same operations"
    );
}

#[test]
fn stress_rejects_unknown_kinds_and_lists_them() {
    let out = mmun()
        .args(["stress", "--skip", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown operation kind"));
    let out = mmun().args(["stress", "--list-kinds"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("devmigrate"));
}

/// Out-of-range options are errors that say what is allowed, never a panic
/// or a run that silently does something else.
#[test]
fn stress_rejects_bad_sizes_with_a_clear_error() {
    for (args, says) in [
        (&["--frames", "1"][..], "need at least 128 frames"),
        (
            &["--frames", "100", "--spaces", "2"][..],
            "need at least 128 frames",
        ),
        (&["--threads", "0"][..], "--threads"),
        (&["--spaces", "0"][..], "--spaces"),
        (&["--spaces", "65"][..], "--spaces"),
        (&["--threads=-1"][..], "-1"),
    ] {
        let out = mmun()
            .arg("stress")
            .args(["--ops", "10"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if args[0] == "--frames" { 1 } else { 2 }),
            "{args:?}: {err}"
        );
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let ok = mmun()
        .args(["stress", "--ops", "200", "--frames", "64", "--spaces", "1"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn trace_is_chrome_trace_event_json() {
    let p = tmp("trace.json");
    let out = mmun()
        .args(["stress", "--ops", "2000", "--threads", "2", "--trace"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let evs = v["traceEvents"].as_array().unwrap();
    let count = |ph: &str| evs.iter().filter(|e| e["ph"] == ph).count();
    assert!(count("B") > 0 && count("B") == count("E"), "balanced spans");
    assert!(count("i") > 0, "oracle checks as instant events");
    assert!(evs.iter().any(|e| e["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("invalidate"))));
    let tids: std::collections::HashSet<_> =
        evs.iter().map(|e| e["tid"].as_u64().unwrap()).collect();
    assert!(tids.len() >= 2, "one track per thread");
}
