//! [`ProcessSpace`]: this process's address space from the best source the
//! machine allows, with the choice reported.

use mmu_notifier::SubscriptionsRef;

use crate::error::FeedError;
use crate::feed::FeedSource;
use crate::space::FeedMm;

/// This process's address space for a registration cache, from the best
/// source available, in this order:
///
/// 1. the privileged helper's feed (`mmfeed-helper`, at
///    [`socket_path`](crate::socket_path)): one load per lookup, no
///    capability needed;
/// 2. a feed from the program set another privileged process pinned in
///    [`pin_dir`](crate::pin_dir) (CAP_BPF, to add this process's feed);
/// 3. a feed from programs this process loads (CAP_BPF + CAP_PERFMON);
/// 4. userfaultfd with the exact flush scope (`uffd::ProcessMm`): exact
///    too, at one `ioctl` per lookup.
///
/// [`path`](Self::path) says which one is active.
pub enum ProcessSpace {
    /// An eBPF feed (from the helper, or loaded here).
    Feed(FeedMm),
    /// userfaultfd, because no feed could be had (the reason is kept).
    Userfaultfd {
        /// The address space.
        mm: uffd::ProcessMm,
        /// Why the feed was not used.
        why_not_feed: String,
    },
}

/// Which source a [`ProcessSpace`] uses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActivePath {
    /// The helper's feed at this socket.
    Helper(std::path::PathBuf),
    /// A feed from the program set pinned in this directory.
    Pinned(std::path::PathBuf),
    /// A feed from programs this process loaded.
    Loaded,
    /// userfaultfd (exact scope), and why the feed was not used.
    Userfaultfd(String),
}

impl std::fmt::Display for ActivePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActivePath::Helper(p) => write!(f, "eBPF feed from the helper at {}", p.display()),
            ActivePath::Pinned(d) => {
                write!(f, "eBPF feed from the programs pinned at {}", d.display())
            }
            ActivePath::Loaded => f.write_str("eBPF feed loaded by this process"),
            ActivePath::Userfaultfd(why) => write!(f, "userfaultfd, exact scope (no feed: {why})"),
        }
    }
}

/// Why neither source could be set up.
#[derive(Debug, thiserror::Error)]
#[error("no source of invalidations for this process: feed: {feed}; userfaultfd: {uffd}")]
pub struct NoSource {
    /// Why the feed failed.
    pub feed: FeedError,
    /// Why userfaultfd failed.
    pub uffd: uffd::UffdError,
}

/// A failure of the active source.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// From the feed.
    #[error(transparent)]
    Feed(#[from] FeedError),
    /// From userfaultfd.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
}

impl ProcessSpace {
    /// The best source available (see the type's docs), reported with
    /// `tracing` at info level.
    ///
    /// # Errors
    /// [`NoSource`] when neither a feed nor userfaultfd can be had.
    pub fn new() -> Result<ProcessSpace, NoSource> {
        let space = match FeedMm::new() {
            Ok(mm) => ProcessSpace::Feed(mm),
            Err(feed) => match uffd::ProcessMm::new() {
                Ok(mm) => ProcessSpace::Userfaultfd {
                    mm,
                    why_not_feed: feed.to_string(),
                },
                Err(uffd) => return Err(NoSource { feed, uffd }),
            },
        };
        tracing::info!("mmfeed: invalidations from {}", space.path());
        Ok(space)
    }

    /// Which source is active.
    pub fn path(&self) -> ActivePath {
        match self {
            ProcessSpace::Feed(mm) => match mm.feed().source() {
                FeedSource::Helper(p) => ActivePath::Helper(p),
                FeedSource::Pinned(d) => ActivePath::Pinned(d),
                _ => ActivePath::Loaded,
            },
            ProcessSpace::Userfaultfd { why_not_feed, .. } => {
                ActivePath::Userfaultfd(why_not_feed.clone())
            }
        }
    }
}

impl std::fmt::Debug for ProcessSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSpace")
            .field("path", &self.path())
            .finish()
    }
}

impl regcache::AddressSpace for ProcessSpace {
    /// userfaultfd's watch; the feed needs none.
    type Watch = Option<uffd::Watch>;
    type Error = SpaceError;

    fn subscriptions(&self) -> &SubscriptionsRef {
        match self {
            ProcessSpace::Feed(mm) => mm.subscriptions(),
            ProcessSpace::Userfaultfd { mm, .. } => mm.subscriptions(),
        }
    }

    fn watch(&self, start: u64, len: u64) -> Result<Self::Watch, SpaceError> {
        match self {
            ProcessSpace::Feed(_) => Ok(None),
            ProcessSpace::Userfaultfd { mm, .. } => Ok(Some(mm.watch(start, len)?)),
        }
    }

    #[inline]
    fn flush(&self) -> Result<(), SpaceError> {
        match self {
            ProcessSpace::Feed(mm) => Ok(mm.flush()?),
            ProcessSpace::Userfaultfd { mm, .. } => Ok(mm.flush()?),
        }
    }
}
