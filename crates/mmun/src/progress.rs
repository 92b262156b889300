//! The progress bar of long runs (indicatif; drawn only when stderr is a
//! terminal).

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting seconds (for `--seconds`) or operations.
pub struct Progress {
    bar: ProgressBar,
    by_time: bool,
    started: Instant,
}

/// A bar, or `None` when not wanted.
pub fn bar(enabled: bool, seconds: Option<u64>, ops: u64) -> Option<Progress> {
    if !enabled {
        return None;
    }
    let (len, unit) = match seconds {
        Some(s) => (s, "s"),
        None => (ops, "ops"),
    };
    let bar = ProgressBar::new(len);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit}  {{msg}}");
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(Progress {
        bar,
        by_time: seconds.is_some(),
        started: Instant::now(),
    })
}

/// Updates the bar after `done` operations.
pub fn tick(p: &Option<Progress>, done: u64) {
    if let Some(p) = p {
        if p.by_time {
            p.bar.set_position(p.started.elapsed().as_secs());
            p.bar.set_message(format!("{done} ops"));
        } else {
            p.bar.set_position(done);
        }
    }
}

/// Clears the bar.
pub fn finish(p: &Option<Progress>) {
    if let Some(p) = p {
        p.bar.finish_and_clear();
    }
}
