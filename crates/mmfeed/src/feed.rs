//! [`Feed`]: this process's feed, attached once per process.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::error::FeedError;
use crate::loader::{AttachPoint, Loaded};
use crate::ring::{Record, Ring, Slot};

/// This process's start/end feed: the BPF programs attached and the feed
/// they write for this process mapped read-only.
///
/// One per process (the programs key feeds by tgid): [`Feed::attach`]
/// returns the live one if there is one. Dropping the last `Arc` unregisters
/// the feed and detaches the programs.
pub struct Feed {
    ring: Ring,
    // After `ring`: the mapping goes before the registration does.
    loaded: Loaded,
}

/// The process's feed while anyone holds it.
static LIVE: Mutex<Weak<Feed>> = Mutex::new(Weak::new());

impl Feed {
    /// Attaches this process's feed, or returns the one already attached.
    ///
    /// # Errors
    /// [`FeedError`] says what the machine or the process refused.
    pub fn attach() -> Result<Arc<Feed>, FeedError> {
        let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(feed) = live.upgrade() {
            return Ok(feed);
        }
        let (loaded, words) = Loaded::load()?;
        let feed = Arc::new(Feed {
            ring: Ring::new(words),
            loaded,
        });
        *live = Arc::downgrade(&feed);
        Ok(feed)
    }

    /// Where the programs run.
    pub fn attach_point(&self) -> AttachPoint {
        self.loaded.attach_point()
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
