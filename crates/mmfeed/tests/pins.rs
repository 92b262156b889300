//! A program set pinned in bpffs by one privileged process is reused by
//! another instead of loading a set of its own (each set taxes every system
//! call of the host again). A test binary of its own: `Feed::attach` is
//! tried with this binary's environment pointing at the test's pins.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mmfeed::{Feed, FeedError, FeedMm, FeedSource, Kind, Programs};

/// Removes the test's pins however the test ends (pinned links would keep
/// the programs attached, and taxing the host, after the test).
struct Unpin(PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = Programs::unpin(&self.0);
    }
}

fn pin_with_the_helper(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_mmfeed-helper"))
        .arg("--pin")
        .arg(dir)
        .output()
        .expect("run mmfeed-helper --pin");
    assert!(
        out.status.success(),
        "mmfeed-helper --pin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_pinned_program_set_is_reused_before_loading_one() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: pinning programs in bpffs needs root (CAP_BPF + CAP_PERFMON)");
        return;
    }
    let dir = PathBuf::from(format!("/sys/fs/bpf/mmfeed-test-{}", std::process::id()));
    let _unpin = Unpin(dir.clone());
    // Pinned by another process, which has exited since.
    pin_with_the_helper(&dir);

    // The setup order takes the pins: no helper answers here, and loading
    // is what it must not do.
    std::env::set_var("MMFEED_SOCKET", dir.join("no-helper.sock"));
    std::env::set_var("MMFEED_PIN_DIR", &dir);
    let feed = Feed::attach().expect("Feed::attach");
    assert_eq!(feed.source(), FeedSource::Pinned(dir.clone()));
    let mm = FeedMm::with_feed(feed).expect("the canary through the pins");
    let a = map(2);
    let got = records_during(mm.feed(), || assert_eq!(raw_munmap(a, 2 * P), 0));
    assert_eq!(got, vec![unmap_start(a, a + 2 * P), Kind::End]);
    drop(mm);

    // Once unpinned (and unheld), there is nothing to reuse.
    Programs::unpin(&dir).unwrap();
    match Feed::reuse_pins(&dir) {
        Err(FeedError::Pins { dir: d, .. }) => assert_eq!(d, dir),
        other => panic!("expected a pins error, got {other:?}"),
    }
}
