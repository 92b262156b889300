//! `mmun`: run scenarios and randomized stress against the software MMU with
//! the coherence oracle on, benchmark, and export traces.
#![forbid(unsafe_code)]

use mmun::{scenario, stress, trace};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mmun",
    version,
    about = "MMU-notifier workbench: stress, scenarios, benchmarks and traces on the software MMU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Randomized concurrent workload with all four mirrors and the oracle on;
    /// exits non-zero on any coherence violation or leak.
    Stress(StressArgs),
    /// Run scenario files (TOML; see scenarios/README.md).
    Run(RunArgs),
    /// Macro benchmark: primary operations per second with 0 vs 4 mirrors.
    Bench(BenchArgs),
}

#[derive(Args)]
struct StressArgs {
    /// Run for this many seconds.
    #[arg(long, conflicts_with = "ops")]
    seconds: Option<u64>,
    /// Run this many operations (default 100000 when --seconds is not given).
    #[arg(long)]
    ops: Option<u64>,
    /// Worker threads (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    threads: usize,
    /// Seed of the workload generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Address spaces (1 to 64).
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    spaces: usize,
    /// Physical frames of the machine (at least 64 per address space).
    #[arg(long, default_value_t = 16384)]
    frames: usize,
    /// Write a Chrome trace-event JSON file (open it in Perfetto).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Leave operation kinds out of the mix (comma-separated, e.g.
    /// `ksm,fork,devmigrate`; names as in `--list-kinds`).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Print the operation kinds and exit.
    #[arg(long)]
    list_kinds: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Scenario files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Write a Chrome trace-event JSON file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// Primary operations per sample.
    #[arg(long, default_value_t = 20000)]
    ops: u64,
    /// Samples of each configuration (alternating).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seed of the operation sequence (the same for both configurations).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn write_trace(path: &Option<PathBuf>) -> Result<(), String> {
    if let Some(p) = path {
        let tracer = trace::Tracer::enable();
        let n = tracer
            .write(p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("trace: {n} events written to {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Stress(a) => {
            if a.list_kinds {
                for k in stress::Kind::ALL {
                    println!("{:<16} {}", format!("{k:?}").to_lowercase(), k.name());
                }
                return ExitCode::SUCCESS;
            }
            let mut skip = Vec::new();
            for name in &a.skip {
                match stress::Kind::parse(name) {
                    Some(k) => skip.push(k),
                    None => {
                        eprintln!("unknown operation kind {name:?} (see --list-kinds)");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if a.trace.is_some() {
                trace::Tracer::enable();
            }
            let min_frames = stress::MIN_FRAMES_PER_SPACE * a.spaces;
            if a.frames < min_frames {
                eprintln!(
                    "--frames {}: {} address spaces need at least {min_frames} frames ({} each: the zero page, each space's shared file and room to fault)",
                    a.frames,
                    a.spaces,
                    stress::MIN_FRAMES_PER_SPACE
                );
                return ExitCode::FAILURE;
            }
            let settings = stress::Settings {
                seconds: a.seconds,
                ops: a.ops,
                threads: a.threads,
                seed: a.seed,
                spaces: a.spaces,
                frames: a.frames,
                progress: std::io::stderr().is_terminal(),
                skip,
            };
            let report = stress::run(&settings);
            print!("{}", report.table);
            if let Err(e) = write_trace(&a.trace) {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
            for v in &report.first {
                eprintln!("VIOLATION {v}");
            }
            for l in &report.leaks {
                eprintln!("LEAK {l}");
            }
            if report.sleeps_in_non_blockable > 0 {
                eprintln!(
                    "SLEEP: {} sleeping locks taken in non-blockable callbacks",
                    report.sleeps_in_non_blockable
                );
            }
            if report.violations > 0
                || !report.leaks.is_empty()
                || report.sleeps_in_non_blockable > 0
            {
                eprintln!(
                    "FAILED (reproduce with --seed {} --threads 1 for a deterministic run)",
                    a.seed
                );
                return ExitCode::FAILURE;
            }
            println!("OK: no coherence violation, no leak");
            ExitCode::SUCCESS
        }
        Cmd::Run(a) => {
            if a.trace.is_some() {
                trace::Tracer::enable();
            }
            let mut failed = 0;
            for f in &a.files {
                match scenario::run_file(f) {
                    Ok((what, n)) => println!("ok    {} ({n} steps) {what}", f.display()),
                    Err(e) => {
                        failed += 1;
                        println!("FAIL  {e}");
                    }
                }
            }
            if let Err(e) = write_trace(&a.trace) {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
            println!("{} passed, {failed} failed", a.files.len() - failed);
            if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Cmd::Bench(a) => {
            let (mut without, mut with) = (Vec::new(), Vec::new());
            for _ in 0..a.rounds.max(1) {
                without.push(stress::primary_only(a.seed, a.ops, false).as_secs_f64());
                with.push(stress::primary_only(a.seed, a.ops, true).as_secs_f64());
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (t0, t4) = (median(&mut without), median(&mut with));
            let ops = a.ops as f64;
            println!(
                "primary operations, {} per sample, {} alternating samples each (median):",
                a.ops, a.rounds
            );
            println!("  0 mirrors: {:>10.0} ops/s", ops / t0);
            println!("  4 mirrors: {:>10.0} ops/s", ops / t4);
            println!(
                "  ratio (4 mirrors / 0): {:.3} of the throughput ({:.2}x the time)",
                t0 / t4,
                t4 / t0
            );
            ExitCode::SUCCESS
        }
    }
}
