//! A configurable notifier that records every callback it gets.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mmu_notifier::{Again, Callbacks, MmuNotifier, PteValue, Range};

/// One recorded callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Release,
    Start(Range),
    End(Range),
    ClearFlushYoung(u64, u64),
    ClearYoung(u64, u64),
    TestYoung(u64),
    ChangePte(u64, PteValue),
    SecondaryTlbs(u64, u64),
}

/// Shared, ordered log of callbacks from several notifiers.
pub type Log = Arc<Mutex<Vec<(&'static str, Call)>>>;

pub fn new_log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

pub struct Recorder {
    pub name: &'static str,
    pub callbacks: Callbacks,
    pub log: Log,
    /// Non-blockable starts fail with Again while set.
    pub fail_start: AtomicBool,
    /// Young callbacks report this.
    pub young: AtomicBool,
    pub releases: AtomicUsize,
    /// Set by the test once unregister returned: any callback after it is a bug.
    pub dead: AtomicBool,
    pub calls_after_dead: AtomicUsize,
}

impl Recorder {
    pub fn new(name: &'static str, callbacks: Callbacks, log: &Log) -> Arc<Recorder> {
        Arc::new(Recorder {
            name,
            callbacks,
            log: log.clone(),
            fail_start: AtomicBool::new(false),
            young: AtomicBool::new(false),
            releases: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            calls_after_dead: AtomicUsize::new(0),
        })
    }

    fn rec(&self, c: Call) {
        if self.dead.load(Ordering::SeqCst) {
            self.calls_after_dead.fetch_add(1, Ordering::SeqCst);
        }
        self.log.lock().unwrap().push((self.name, c));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| *n == self.name)
            .map(|(_, c)| c.clone())
            .collect()
    }
}

impl MmuNotifier for Recorder {
    fn callbacks(&self) -> Callbacks {
        self.callbacks
    }
    fn release(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.rec(Call::Release);
    }
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        self.rec(Call::ClearFlushYoung(start, end));
        self.young.load(Ordering::SeqCst)
    }
    fn clear_young(&self, start: u64, end: u64) -> bool {
        self.rec(Call::ClearYoung(start, end));
        self.young.load(Ordering::SeqCst)
    }
    fn test_young(&self, address: u64) -> bool {
        self.rec(Call::TestYoung(address));
        self.young.load(Ordering::SeqCst)
    }
    fn change_pte(&self, address: u64, pte: PteValue) {
        self.rec(Call::ChangePte(address, pte));
    }
    fn invalidate_range_start(&self, range: &Range) -> Result<(), Again> {
        self.rec(Call::Start(*range));
        if self.fail_start.load(Ordering::SeqCst) {
            Err(Again)
        } else {
            Ok(())
        }
    }
    fn invalidate_range_end(&self, range: &Range) {
        self.rec(Call::End(*range));
    }
    fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        self.rec(Call::SecondaryTlbs(start, end));
    }
}

pub const START_END: Callbacks =
    Callbacks::INVALIDATE_RANGE_START.union(Callbacks::INVALIDATE_RANGE_END);

pub fn range(start: u64, end: u64) -> Range {
    Range::new(start, end, mmu_notifier::Event::Unmap).unwrap()
}

/// An interval notifier user: records every invalidate, keeps `set_seq`
/// under its lock (the HMM pattern), and can be told to fail non-blockable
/// invalidations.
pub struct Mirror {
    pub lock: mmu_notifier::CheckedMutex<()>,
    /// (range, cur_seq) of every invalidate.
    pub calls: Mutex<Vec<(Range, u64)>>,
    /// Non-blockable invalidations return false while set.
    pub fail_nonblock: AtomicBool,
    /// Skip set_seq (a user that does not use read_begin/read_retry).
    pub no_set_seq: AtomicBool,
}

impl Mirror {
    pub fn new() -> Arc<Mirror> {
        Arc::new(Mirror {
            lock: mmu_notifier::CheckedMutex::new(()),
            calls: Mutex::new(Vec::new()),
            fail_nonblock: AtomicBool::new(false),
            no_set_seq: AtomicBool::new(false),
        })
    }

    pub fn calls(&self) -> Vec<(Range, u64)> {
        self.calls.lock().unwrap().clone()
    }
}

impl mmu_notifier::IntervalOps for Mirror {
    fn invalidate(
        &self,
        sub: &mmu_notifier::IntervalNotifier,
        range: &Range,
        cur_seq: u64,
    ) -> bool {
        if !range.blockable() && self.fail_nonblock.load(Ordering::SeqCst) {
            return false;
        }
        let _g = self.lock.lock();
        if !self.no_set_seq.load(Ordering::SeqCst) {
            sub.set_seq(cur_seq);
        }
        self.calls.lock().unwrap().push((*range, cur_seq));
        true
    }
}

/// A list notifier whose non-blockable start always fails (an OOM-reaper
/// victim), declared with START_MAY_FAIL and no end callback.
pub struct FailsNonBlockStart;

impl MmuNotifier for FailsNonBlockStart {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::START_MAY_FAIL
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        if r.blockable() {
            Ok(())
        } else {
            Err(Again)
        }
    }
}
