//! Reading back what criterion measured, for the summaries that print
//! ratios against an anchor measured in the same run. Shared by the
//! workspace's benchmarks (`#[path]`-included).

use std::path::Path;

/// The time per iteration criterion reports for `<group>/<id>` (its slope
/// estimate, else the mean), in ns; `target_tmpdir` is the benchmark's
/// `CARGO_TARGET_TMPDIR` (criterion's results live next to it).
pub fn estimate_ns(target_tmpdir: &str, group: &str, id: &str) -> Option<f64> {
    let path = Path::new(target_tmpdir)
        .parent()?
        .join("criterion")
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let json = std::fs::read_to_string(path).ok()?;
    let estimate = |key: &str| -> Option<f64> {
        let at = &json[json.find(&format!("\"{key}\":{{"))?..];
        let v = &at[at.find("\"point_estimate\":")? + 17..];
        v[..v.find([',', '}'])?].trim().parse().ok()
    };
    estimate("slope").or_else(|| estimate("mean"))
}
