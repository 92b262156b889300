//! `mmfeed-helper [SOCKET]`: loads the feed's programs once for the whole
//! host and hands each client process its own feed over a Unix socket
//! (default `/run/mmfeed.sock`), so that clients need no capability and
//! the host carries one program set however many processes use it.
//!
//! Needs CAP_BPF + CAP_PERFMON (or root) and a kernel with BTF. The socket
//! is made world-connectable: a client learns only its own calls (the
//! helper takes its process id from the kernel's peer credentials).
//! Prints `ready` on stdout once it accepts connections.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    let path = std::env::args_os()
        .nth(1)
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
