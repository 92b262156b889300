//! The privileged helper's protocol: one host-wide program set, and a feed
//! per client process handed over a Unix socket.
//!
//! The helper (`mmfeed-helper`, running with CAP_BPF + CAP_PERFMON, or as
//! root) loads the programs once. A client connects; the helper reads the
//! client's process id from the socket's peer credentials (the kernel's
//! word, not the client's), creates a feed registered under that process
//! only, and sends its descriptor with `SCM_RIGHTS` after one byte that
//! says where the programs run (`F`: the `syscalls` tracepoints, `B`: the
//! BTF raw tracepoints), or sends `E` and a reason. The client maps the feed and makes no `bpf()` call.
//! The feed stays registered while the connection is open; the helper
//! unregisters it when the client closes it or exits. A client therefore
//! sees its own calls and nobody else's (another process's munmap addresses
//! would leak its layout), and one process has one feed at a time.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rustix::net::{
    recvmsg, sendmsg, sockopt, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use crate::error::FeedError;
use crate::loader::{tgid_of, AttachPoint, Programs};

/// Where the helper listens, and where clients look, unless the environment
/// variable `MMFEED_SOCKET` names another path.
pub const DEFAULT_SOCKET: &str = "/run/mmfeed.sock";

/// The socket path clients use: `MMFEED_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path() -> std::path::PathBuf {
    std::env::var_os("MMFEED_SOCKET")
        .map(Into::into)
        .unwrap_or_else(|| DEFAULT_SOCKET.into())
}

struct Server {
    programs: Mutex<Programs>,
    /// Processes with a feed now.
    clients: Mutex<HashSet<u32>>,
}

/// Serves clients on `listener` with `programs`, one thread per client,
/// until accepting fails.
///
/// # Errors
/// The error `accept` returned.
pub fn serve(listener: UnixListener, programs: Programs) -> io::Result<()> {
    let server = Arc::new(Server {
        programs: Mutex::new(programs),
        clients: Mutex::new(HashSet::new()),
    });
    loop {
        let (stream, _) = listener.accept()?;
        let server = server.clone();
        std::thread::spawn(move || {
            if let Err(e) = server.client(stream) {
                tracing::warn!(error = %e, "mmfeed-helper: a client failed");
            }
        });
    }
}

impl Server {
    fn client(&self, mut stream: UnixStream) -> io::Result<()> {
        let tgid = tgid_of(sockopt::socket_peercred(&stream)?.pid);
        if !self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tgid)
        {
            return refuse(&mut stream, "this process already has a feed");
        }
        let added = self
            .programs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_feed(tgid);
        let result = match added {
            Err(e) => refuse(&mut stream, &e.to_string()),
            Ok(feed) => {
                let point = self
                    .programs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .attach_point();
                let sent = send_fd(&stream, feed.fd(), point);
                if sent.is_ok() {
                    // Held until the client closes the connection or exits.
                    let mut byte = [0u8; 1];
                    while matches!(stream.read(&mut byte), Ok(n) if n > 0) {}
                }
                self.programs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove_feed(&feed);
                sent
            }
        };
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&tgid);
        result
    }
}

fn refuse(stream: &mut UnixStream, why: &str) -> io::Result<()> {
    stream.write_all(b"E")?;
    stream.write_all(why.as_bytes())
}

/// The first byte of a feed's answer: where the helper's programs run.
fn answer_byte(point: AttachPoint) -> u8 {
    match point {
        AttachPoint::SyscallTracepoints => b'F',
        AttachPoint::BtfRawTracepoints => b'B',
    }
}

fn send_fd(
    stream: &UnixStream,
    fd: std::os::fd::BorrowedFd<'_>,
    point: AttachPoint,
) -> io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    sendmsg(
        stream.as_fd(),
        &[io::IoSlice::new(&[answer_byte(point)])],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Connects to the helper at `path` and receives this process's feed, and
/// where the helper's programs run.
pub(crate) fn connect(path: &Path) -> Result<(UnixStream, OwnedFd, AttachPoint), FeedError> {
    let helper = |why: String| FeedError::Helper {
        path: path.to_path_buf(),
        why,
    };
    let mut stream = UnixStream::connect(path).map_err(|e| helper(e.to_string()))?;
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        stream.as_fd(),
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| helper(e.to_string()))?;
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            fd = fds.next();
        }
    }
    match (got.bytes, byte[0], fd) {
        (1, b'F', Some(fd)) => Ok((stream, fd, AttachPoint::SyscallTracepoints)),
        (1, b'B', Some(fd)) => Ok((stream, fd, AttachPoint::BtfRawTracepoints)),
        (1, b'E', _) => {
            let mut why = String::new();
            let _ = stream.read_to_string(&mut why);
            Err(helper(format!("refused: {why}")))
        }
        _ => Err(helper("an answer that is not the protocol's".into())),
    }
}
