//! [`Feed`]: this process's feed, attached once per process.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::error::FeedError;
use crate::loader::{AttachPoint, Loaded};
use crate::ring::{Record, Ring, Slot, WORDS};
use crate::sys::SharedWords;

/// This process's start/end feed: the BPF programs attached and the feed
/// they write for this process mapped read-only.
///
/// One per process (the programs key feeds by tgid): [`Feed::attach`]
/// returns the live one if there is one. Dropping the last `Arc` unregisters
/// the feed (and detaches the programs this process loaded).
pub struct Feed {
    ring: Ring,
    // After `ring`: the mapping goes before the registration does.
    source: Source,
}

/// Where a process's feed comes from.
enum Source {
    /// Programs this process loaded for itself.
    Loaded(Box<Loaded>),
    /// The set pinned in this directory, with this process's feed added.
    Pinned(Box<Loaded>, PathBuf),
    /// The helper's; the feed stays registered while the connection is open.
    Helper {
        path: PathBuf,
        point: AttachPoint,
        _connection: UnixStream,
        _map: OwnedFd,
    },
}

/// Which way the feed was set up (what [`Feed::attach`] chose).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedSource {
    /// From the privileged helper listening at this path: one host-wide
    /// program set, and this process needs no capability.
    Helper(PathBuf),
    /// The program set another process pinned in this bpffs directory
    /// (this process has CAP_BPF, to add its feed, and loads nothing).
    Pinned(PathBuf),
    /// Programs this process loaded itself (it has CAP_BPF + CAP_PERFMON).
    Loaded,
}

/// The process's feed while anyone holds it, with the process it is for: a
/// forked child inherits the parent's and must not use it.
static LIVE: Mutex<(u32, Weak<Feed>)> = Mutex::new((0, Weak::new()));

impl Feed {
    /// This process's feed: the live one if there is one; else from the
    /// privileged helper if its socket ([`socket_path`](crate::socket_path):
    /// `MMFEED_SOCKET`, else `/run/mmfeed.sock`) answers; else from the
    /// program set pinned in [`pin_dir`](crate::pin_dir) (`MMFEED_PIN_DIR`,
    /// else `/sys/fs/bpf/mmfeed`) if there is one; else programs loaded by
    /// this process. [`source`](Self::source) says which.
    ///
    /// # Errors
    /// [`FeedError::Load`] (with the helper's and the pins' failures, where
    /// they were tried) when no way works.
    pub fn attach() -> Result<Arc<Feed>, FeedError> {
        Self::live_or(|| {
            let mut tried = String::new();
            let path = crate::helper::socket_path();
            if path.exists() {
                match Self::from_helper(&path) {
                    Ok(feed) => return Ok(feed),
                    Err(e) => tried.push_str(&format!(" (after the helper: {e})")),
                }
            }
            let pins = crate::loader::pin_dir();
            if pins.exists() {
                match Self::from_pins(&pins) {
                    Ok(feed) => return Ok(feed),
                    Err(e) => tried.push_str(&format!(" (after the pins: {e})")),
                }
            }
            Self::from_programs().map_err(|e| match e {
                FeedError::Load(why) => FeedError::Load(format!("{why}{tried}")),
                other => other,
            })
        })
    }

    /// This process's feed from the helper at `path` (or the live one).
    ///
    /// # Errors
    /// [`FeedError::Helper`]: not reachable, or it refused.
    pub fn connect(path: &std::path::Path) -> Result<Arc<Feed>, FeedError> {
        Self::live_or(|| Self::from_helper(path))
    }

    /// This process's feed from the program set pinned in `dir` (or the
    /// live one).
    ///
    /// # Errors
    /// [`FeedError::Pins`] (no complete set there), or [`FeedError::Load`]
    /// (this process may not add its feed: it needs CAP_BPF).
    pub fn reuse_pins(dir: &std::path::Path) -> Result<Arc<Feed>, FeedError> {
        Self::live_or(|| Self::from_pins(dir))
    }

    /// This process's feed from programs it loads itself (or the live one).
    ///
    /// # Errors
    /// [`FeedError::Load`] or [`FeedError::Attach`].
    pub fn load() -> Result<Arc<Feed>, FeedError> {
        Self::live_or(Self::from_programs)
    }

    fn live_or(make: impl FnOnce() -> Result<Feed, FeedError>) -> Result<Arc<Feed>, FeedError> {
        let pid = crate::loader::this_tgid();
        let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        if live.0 == pid {
            if let Some(feed) = live.1.upgrade() {
                return Ok(feed);
            }
        }
        let feed = Arc::new(make()?);
        *live = (pid, Arc::downgrade(&feed));
        Ok(feed)
    }

    fn from_helper(path: &std::path::Path) -> Result<Feed, FeedError> {
        let (connection, map, point) = crate::helper::connect(path)?;
        let words = SharedWords::map(map.as_fd(), WORDS).map_err(FeedError::Map)?;
        Ok(Feed {
            ring: Ring::new(words),
            source: Source::Helper {
                path: path.to_path_buf(),
                point,
                _connection: connection,
                _map: map,
            },
        })
    }

    fn from_pins(dir: &std::path::Path) -> Result<Feed, FeedError> {
        let (loaded, words) = Loaded::from_pins(dir)?;
        Ok(Feed {
            ring: Ring::new(words),
            source: Source::Pinned(Box::new(loaded), dir.to_path_buf()),
        })
    }

    fn from_programs() -> Result<Feed, FeedError> {
        let (loaded, words) = Loaded::load()?;
        Ok(Feed {
            ring: Ring::new(words),
            source: Source::Loaded(Box::new(loaded)),
        })
    }

    /// Which way the feed was set up.
    pub fn source(&self) -> FeedSource {
        match &self.source {
            Source::Loaded(_) => FeedSource::Loaded,
            Source::Pinned(_, dir) => FeedSource::Pinned(dir.clone()),
            Source::Helper { path, .. } => FeedSource::Helper(path.clone()),
        }
    }

    /// Where the programs run.
    pub fn attach_point(&self) -> AttachPoint {
        match &self.source {
            Source::Loaded(l) | Source::Pinned(l, _) => l.attach_point(),
            Source::Helper { point, .. } => *point,
        }
    }

    /// Records published so far; the next record will have this index. One
    /// acquire load of the shared feed.
    #[inline]
    pub fn head(&self) -> u64 {
        self.ring.head()
    }

    /// Calls of this process that published a START and have not returned.
    pub fn inflight(&self) -> u64 {
        self.ring.inflight()
    }

    /// Record `index` (below [`head`](Self::head)), waiting while its writer
    /// finishes it; `None` if it was overwritten (the reader fell more than
    /// [`SLOTS`](crate::SLOTS) records behind).
    pub fn record(&self, index: u64) -> Option<Record> {
        let mut round = 0;
        loop {
            match self.ring.read(index) {
                Slot::Ready(r) => return Some(r),
                Slot::Lost => return None,
                Slot::NotYet => relax(&mut round),
            }
        }
    }

    pub(crate) fn ring(&self) -> &Ring {
        &self.ring
    }
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("source", &self.source())
            .field("attach_point", &self.attach_point())
            .field("head", &self.head())
            .finish()
    }
}

/// One round of waiting for a writer in the kernel: spin briefly, then
/// yield (the writer may have been preempted).
pub(crate) fn relax(round: &mut u32) {
    if *round < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *round = round.saturating_add(1);
}
