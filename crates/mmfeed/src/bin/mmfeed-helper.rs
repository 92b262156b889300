//! `mmfeed-helper [SOCKET]`: loads the feed's programs once for the whole
//! host and hands each client process its own feed over a Unix socket
//! (default `/run/mmfeed.sock`), so that clients need no capability and
//! the host carries one program set however many processes use it.
//!
//! Needs CAP_BPF + CAP_PERFMON (or root) and a kernel with BTF. The socket
//! is made world-connectable: a client learns only its own calls (the
//! helper takes its process id from the kernel's peer credentials).
//! Prints `ready` on stdout once it accepts connections.
//!
//! `mmfeed-helper --pin [DIR]` instead loads the programs, pins them in the
//! bpffs directory DIR (default `/sys/fs/bpf/mmfeed`, or `MMFEED_PIN_DIR`)
//! and exits: the programs stay attached, and processes with CAP_BPF reuse
//! them instead of loading their own set. `mmfeed-helper --unpin [DIR]`
//! removes them.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let first = args.next();
    let rest = args.next().map(std::path::PathBuf::from);
    if args.next().is_some() {
        return usage();
    }
    match first.as_ref().and_then(|a| a.to_str()) {
        Some("--pin") => return pin(rest.unwrap_or_else(mmfeed::pin_dir)),
        Some("--unpin") => return unpin(rest.unwrap_or_else(mmfeed::pin_dir)),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(a) if a.starts_with('-') => return usage(),
        _ if rest.is_some() => return usage(),
        _ => {}
    }
    let path = first
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| mmfeed::DEFAULT_SOCKET.into());
    let programs = match mmfeed::Programs::load() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mmfeed-helper: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A socket left by an earlier helper that is gone.
    if std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mmfeed-helper: cannot listen at {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)) {
        eprintln!(
            "mmfeed-helper: cannot open {} to clients: {e}",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    match mmfeed::serve(listener, programs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mmfeed-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: mmfeed-helper [SOCKET] | --pin [DIR] | --unpin [DIR]";

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

/// Loads the programs and pins them in `dir`.
fn pin(dir: std::path::PathBuf) -> ExitCode {
    let pinned = mmfeed::Programs::load().and_then(|p| p.pin(&dir));
    match pinned {
        Ok(()) => {
            println!("pinned at {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mmfeed-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Removes the set pinned in `dir`.
fn unpin(dir: std::path::PathBuf) -> ExitCode {
    match mmfeed::Programs::unpin(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mmfeed-helper: unpinning {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
