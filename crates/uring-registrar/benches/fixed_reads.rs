//! Reads into a buffer three ways, side by side in one run (compare as
//! ratios; the summary at the end prints them):
//!
//! * `cache`: `RegCache<ProcessMm, UringRegistrar>::get` (a hit, with the
//!   default exact flush scope) + READ_FIXED + dropping the guard;
//! * `register_per_io`: registering the buffer in a slot, READ_FIXED,
//!   clearing the slot (what an application without a cache does);
//! * `plain_read`: IORING_OP_READ (the kernel pins the pages per request).
//!
//! At 4 KiB, 64 KiB and 1 MiB, on a page-cached file and, when the bench
//! can set one up (root, `losetup`, a tmpfs at /dev/shm), with O_DIRECT on
//! a loop device. `cargo bench -p uring-registrar --bench fixed_reads`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{BenchmarkId, Criterion};
use regcache::{Access, RegCache, Registrar};
use uffd::ProcessMm;
use uring_registrar::UringRegistrar;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{pattern_file, Ring};

const SIZES: [u64; 3] = [4 << 10, 64 << 10, 1 << 20];
const FILE_LEN: u64 = 64 << 20;
const WAYS: [&str; 3] = ["cache", "register_per_io", "plain_read"];

/// A loop device over a tmpfs file, detached on drop.
struct LoopDev {
    dev: String,
    backing: PathBuf,
}

impl LoopDev {
    fn new() -> Result<LoopDev, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".into());
        }
        let backing =
            Path::new("/dev/shm").join(format!("uring-registrar-bench-{}", std::process::id()));
        let f =
            File::create(&backing).map_err(|e| format!("creating {}: {e}", backing.display()))?;
        f.set_len(FILE_LEN).map_err(|e| e.to_string())?;
        drop(f);
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup: {e} (Debian: apt-get install mount)"))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&backing);
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDev { dev, backing })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn bench_file(c: &mut Criterion, group: &str, file: &File) {
    let mm = ProcessMm::new().expect("userfaultfd");
    let (cached_ring, raw_ring) = (
        Ring::new().expect("io_uring"),
        Ring::new().expect("io_uring"),
    );
    let cache = RegCache::new(
        mm,
        cached_ring.with(|r| UringRegistrar::new(r, 64)).unwrap(),
    );
    let raw = raw_ring.with(|r| UringRegistrar::new(r, 64)).unwrap();
    // The buffer every way reads into (1 MiB, never unmapped).
    let buf = common::anon(1 << 20);
    let mut g = c.benchmark_group(group);
    for size in SIZES {
        let slots = FILE_LEN / size;
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut off = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % slots) * size
        };
        let len = size as u32;
        g.bench_with_input(BenchmarkId::new("cache", size), &size, |b, _| {
            b.iter(|| {
                let e = cache.get(buf, size, Access::WRITE).unwrap();
                let n = cached_ring.read_fixed(file, buf, len, e.handle().index(), off());
                assert_eq!(n, len as i32);
            })
        });
        g.bench_with_input(BenchmarkId::new("register_per_io", size), &size, |b, _| {
            b.iter(|| {
                let h = raw.register(buf, buf + size, Access::WRITE).unwrap();
                let n = raw_ring.read_fixed(file, buf, len, h.index(), off());
                raw.deregister(h).unwrap();
                assert_eq!(n, len as i32);
            })
        });
        g.bench_with_input(BenchmarkId::new("plain_read", size), &size, |b, _| {
            b.iter(|| assert_eq!(cached_ring.read(file, buf, len, off()), len as i32))
        });
    }
    g.finish();
}

/// The time per read criterion reports for one benchmark (its slope
/// estimate, else the mean), in ns.
fn mean_ns(group: &str, way: &str, size: u64) -> Option<f64> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()?
        .join("criterion");
    let json = std::fs::read_to_string(
        dir.join(group)
            .join(way)
            .join(size.to_string())
            .join("new/estimates.json"),
    )
    .ok()?;
    let estimate = |key: &str| -> Option<f64> {
        let at = &json[json.find(&format!("\"{key}\":{{"))?..];
        let v = &at[at.find("\"point_estimate\":")? + 17..];
        v[..v.find([',', '}'])?].trim().parse().ok()
    };
    estimate("slope").or_else(|| estimate("mean"))
}

fn summary(groups: &[&str]) {
    println!("\nsummary (time per read; the others as multiples of the cache's):");
    println!(
        "{:<24} {:>8} {:>12} {:>18} {:>14}",
        "group", "size", "cache", "register_per_io", "plain_read"
    );
    for group in groups {
        for size in SIZES {
            let t: Vec<_> = WAYS.iter().map(|w| mean_ns(group, w, size)).collect();
            let Some(cache) = t[0] else { continue };
            let cell = |v: Option<f64>| {
                v.map_or("-".into(), |v| {
                    format!("{:.2}x ({:.1} us)", v / cache, v / 1e3)
                })
            };
            println!(
                "{:<24} {:>8} {:>12} {:>18} {:>14}",
                group,
                size,
                format!("{:.1} us", cache / 1e3),
                cell(t[1]),
                cell(t[2])
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    if let Err(e) = common::memlock_allows(4 << 20) {
        eprintln!("SKIPPED fixed_reads: {e}");
        return;
    }
    if let Err(e) = Ring::new() {
        eprintln!("SKIPPED fixed_reads: io_uring unavailable: {e}");
        return;
    }
    let mut groups = vec!["fixed_reads_page_cache"];
    let (file, _) = pattern_file(&std::env::temp_dir(), FILE_LEN as usize);
    bench_file(&mut c, groups[0], &file);
    match LoopDev::new() {
        Ok(dev) => {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&dev.dev)
                .expect("open the loop device with O_DIRECT");
            groups.push("fixed_reads_o_direct_loop");
            bench_file(&mut c, groups[1], &f);
        }
        Err(why) => eprintln!("SKIPPED fixed_reads_o_direct_loop: {why}"),
    }
    c.final_summary();
    summary(&groups);
}
