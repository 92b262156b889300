//! The feed's layout (shared with `bpf/mmfeed.bpf.c`) and the reading of
//! one record.
//!
//! The feed is one array value: a header of 8 words (`head`: records claimed
//! so far; `inflight`: calls that published a START and have not exited;
//! `tokens`: owner tokens handed to io_uring requests), then [`SLOTS`]
//! records of 4 words (`start`, `end`, `owner | kind << 32`, `seq`). The
//! owner is the calling thread's id, or for an io_uring request a token with
//! the top bit set. Record `i` lives in slot `i % SLOTS`. A writer claims `i` with an
//! atomic add on `head`, sets the slot's `seq` to 0, writes the fields, and
//! sets `seq` to `i + 1`, both with full barriers (BPF atomic exchange).

use std::sync::atomic::{fence, AtomicU64, Ordering};

use mmu_notifier::Event;

use crate::sys::SharedWords;

/// Records the feed holds before a writer overwrites the oldest.
pub const SLOTS: u64 = 1024;
const HEADER_WORDS: usize = 8;
const SLOT_WORDS: usize = 4;
/// Size of the feed in 64-bit words (the BPF map's value).
pub(crate) const WORDS: usize = HEADER_WORDS + SLOTS as usize * SLOT_WORDS;
/// The map value as aya creates it (`[u64; N]` is a `Pod`).
pub(crate) type Value = [u64; WORDS];

const KIND_START: u32 = 1;
const KIND_END: u32 = 2;
const KIND_UNPAIRED: u32 = 3;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A call that takes memory away entered the kernel: `invalidate_range_start`.
    Start {
        /// The first byte (page-aligned).
        start: u64,
        /// One past the last byte (page-aligned, or `u64::MAX` for all).
        end: u64,
        /// Why (munmap and friends: `Unmap`; madvise: `Clear`).
        event: Event,
    },
    /// That thread's call returned (or that io_uring request completed):
    /// `invalidate_range_end` of its STARTs.
    End,
    /// A START whose end the kernel will not report: an io_uring
    /// `IORING_OP_MADVISE` submitted with `IOSQE_CQE_SKIP_SUCCESS` posts no
    /// completion when it succeeds, so when its pages are gone cannot be
    /// known.
    Unpaired {
        /// The first byte (page-aligned).
        start: u64,
        /// One past the last byte (page-aligned).
        end: u64,
    },
}

/// One record of the feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its position in the feed (0 for the first record ever published).
    pub index: u64,
    /// The thread that made the call, or for an io_uring request the token
    /// (top bit set) its START and END share.
    pub tid: u32,
    /// What happened.
    pub kind: Kind,
}

/// Result of reading one position.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The record, complete.
    Ready(Record),
    /// Claimed but still being written: read again.
    NotYet,
    /// Overwritten by a later record: the reader fell `SLOTS` behind.
    Lost,
}

/// The mapped feed.
pub(crate) struct Ring {
    words: SharedWords,
}

impl Ring {
    pub(crate) fn new(words: SharedWords) -> Ring {
        debug_assert_eq!(words.words().len(), WORDS);
        Ring { words }
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        &self.words.words()[i]
    }

    /// Records claimed so far (an acquire load: what it counts is visible
    /// once its slot's `seq` says so).
    #[inline]
    pub(crate) fn head(&self) -> u64 {
        self.word(0).load(Ordering::Acquire)
    }

    /// Calls with a START published and no END yet.
    pub(crate) fn inflight(&self) -> u64 {
        self.word(1).load(Ordering::Acquire)
    }

    /// Reads record `index`.
    pub(crate) fn read(&self, index: u64) -> Slot {
        let base = HEADER_WORDS + (index % SLOTS) as usize * SLOT_WORDS;
        let want = index + 1;
        let seq = self.word(base + 3).load(Ordering::Acquire);
        if seq != want {
            let lapped = seq > want || self.head().saturating_sub(index) > SLOTS;
            return if lapped { Slot::Lost } else { Slot::NotYet };
        }
        let start = self.word(base).load(Ordering::Relaxed);
        let end = self.word(base + 1).load(Ordering::Relaxed);
        let tid_kind = self.word(base + 2).load(Ordering::Relaxed);
        // The fields were read before `seq` is checked again: a writer that
        // lapped us zeroes `seq` before touching them.
        fence(Ordering::Acquire);
        if self.word(base + 3).load(Ordering::Relaxed) != want {
            return Slot::Lost;
        }
        let tid = tid_kind as u32;
        let kind = (tid_kind >> 32) as u32;
        let kind = match kind & 0xff {
            KIND_START => Kind::Start {
                start,
                end,
                event: event_of(kind >> 8),
            },
            KIND_END => Kind::End,
            KIND_UNPAIRED => Kind::Unpaired { start, end },
            // Not written by the shipped programs: treat as "everything".
            _ => Kind::Start {
                start: 0,
                end: u64::MAX,
                event: Event::Unmap,
            },
        };
        Slot::Ready(Record { index, tid, kind })
    }
}

fn event_of(code: u32) -> Event {
    match code {
        1 => Event::Clear,
        _ => Event::Unmap,
    }
}
