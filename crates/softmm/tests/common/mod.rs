//! Recording secondaries for the hook tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mmu_notifier::{
    Again, Callbacks, Event, IntervalNotifier, IntervalOps, MmuNotifier, Owner, Range,
};
use softmm::{FrameRef, MapKind, Mm, MmGrab, PhysMem, Prot, Pte, PAGE_SIZE};

pub const P: u64 = PAGE_SIZE;

/// What a recorder saw, in order (shared by every recorder of a test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Start(Range),
    End(Range),
    Interval(Range),
    Release,
    ChangePte {
        addr: u64,
        pfn: u64,
        writable: bool,
        /// The primary PTE at the moment of the call.
        primary: Option<Pte>,
    },
    ClearFlushYoung(u64, u64),
    ClearYoung(u64, u64),
    TestYoung(u64),
    Tlb(u64, u64),
    /// Marker pushed by the test itself.
    Mark(&'static str),
}

#[derive(Default)]
pub struct Log {
    pub calls: Mutex<Vec<Call>>,
    /// Frames the test watches: at each invalidation callback, whether all
    /// of them were still allocated is recorded in `alive_at_invalidate`.
    pub watch: Mutex<Vec<FrameRef>>,
    pub alive_at_invalidate: Mutex<Vec<bool>>,
    pub phys: OnceLock<Arc<PhysMem>>,
    pub mm: OnceLock<MmGrab>,
}

impl Log {
    pub fn new(mm: &Mm) -> Arc<Log> {
        let log = Arc::new(Log::default());
        let _ = log.phys.set(mm.phys().clone());
        let _ = log.mm.set(mm.grab());
        log
    }

    pub fn push(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }

    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn note_alive(&self) {
        let w = self.watch.lock().unwrap().clone();
        if w.is_empty() {
            return;
        }
        let phys = self.phys.get().unwrap();
        let alive = w.iter().all(|f| phys.is_current(*f));
        self.alive_at_invalidate.lock().unwrap().push(alive);
    }

    pub fn watch(&self, frames: &[FrameRef]) {
        *self.watch.lock().unwrap() = frames.to_vec();
    }
}

/// A classic notifier recording every callback except the secondary-TLB one.
pub struct Rec {
    pub log: Arc<Log>,
    /// Answer of the young callbacks.
    pub young: AtomicBool,
    /// Fail non-blockable starts with `Again`.
    pub fail_nonblock: bool,
}

/// A log of `mm`'s hook calls, with a recording notifier registered.
pub fn log_of(mm: &Mm) -> Arc<Log> {
    let log = Log::new(mm);
    Rec::register(mm, &log);
    log
}

impl Rec {
    pub fn register(mm: &Mm, log: &Arc<Log>) -> Arc<Rec> {
        Self::register_with(mm, log, false)
    }

    pub fn register_with(mm: &Mm, log: &Arc<Log>, fail_nonblock: bool) -> Arc<Rec> {
        let r = Arc::new(Rec {
            log: log.clone(),
            young: AtomicBool::new(false),
            fail_nonblock,
        });
        mm.subscriptions().register(r.clone()).unwrap();
        r
    }
}

impl MmuNotifier for Rec {
    fn callbacks(&self) -> Callbacks {
        let base = Callbacks::RELEASE
            | Callbacks::CLEAR_FLUSH_YOUNG
            | Callbacks::CLEAR_YOUNG
            | Callbacks::TEST_YOUNG
            | Callbacks::CHANGE_PTE
            | Callbacks::INVALIDATE_RANGE_START;
        if self.fail_nonblock {
            base | Callbacks::START_MAY_FAIL
        } else {
            base | Callbacks::INVALIDATE_RANGE_END
        }
    }
    fn release(&self) {
        self.log.push(Call::Release);
    }
    fn clear_flush_young(&self, s: u64, e: u64) -> bool {
        self.log.push(Call::ClearFlushYoung(s, e));
        self.young.load(Ordering::Relaxed)
    }
    fn clear_young(&self, s: u64, e: u64) -> bool {
        self.log.push(Call::ClearYoung(s, e));
        self.young.load(Ordering::Relaxed)
    }
    fn test_young(&self, a: u64) -> bool {
        self.log.push(Call::TestYoung(a));
        self.young.load(Ordering::Relaxed)
    }
    fn change_pte(&self, addr: u64, pte: mmu_notifier::PteValue) {
        let primary = self.log.mm.get().and_then(|m| m.pte(addr));
        self.log.push(Call::ChangePte {
            addr,
            pfn: pte.pfn,
            writable: pte.writable,
            primary,
        });
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        if self.fail_nonblock && !r.blockable() {
            return Err(Again);
        }
        self.log.note_alive();
        self.log.push(Call::Start(*r));
        Ok(())
    }
    fn invalidate_range_end(&self, r: &Range) {
        self.log.push(Call::End(*r));
    }
}

/// A secondary-TLB notifier (exclusive with start/end).
pub struct TlbRec {
    pub log: Arc<Log>,
}

impl TlbRec {
    pub fn register(mm: &Mm, log: &Arc<Log>) {
        mm.subscriptions()
            .register(Arc::new(TlbRec { log: log.clone() }))
            .unwrap();
    }
}

impl MmuNotifier for TlbRec {
    fn callbacks(&self) -> Callbacks {
        Callbacks::ARCH_INVALIDATE_SECONDARY_TLBS
    }
    fn arch_invalidate_secondary_tlbs(&self, s: u64, e: u64) {
        // Record whether the watched frames are still allocated at flush time.
        self.log.note_alive();
        self.log.push(Call::Tlb(s, e));
    }
}

/// An interval notifier recording its invalidations.
pub struct IRec {
    pub log: Arc<Log>,
}

impl IntervalOps for IRec {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
        sub.set_seq(seq);
        self.log.note_alive();
        self.log.push(Call::Interval(*r));
        true
    }
}

pub fn irec(mm: &Mm, log: &Arc<Log>, start: u64, len: u64) -> IntervalNotifier {
    mm.subscriptions()
        .interval_insert(start, len, Arc::new(IRec { log: log.clone() }))
        .unwrap()
}

pub fn machine(frames: usize) -> (Arc<PhysMem>, Mm) {
    let phys = PhysMem::new(frames);
    let mm = Mm::new(&phys);
    (phys, mm)
}

/// Maps `n` private pages and writes `fill + i` into the first byte of
/// page i; returns the address.
pub fn populated(mm: &Mm, n: u64, fill: u8) -> u64 {
    let a = mm.mmap(n * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    for i in 0..n {
        mm.write(a + i * P, &[fill.wrapping_add(i as u8)]).unwrap();
    }
    a
}

pub fn frame_at(mm: &Mm, addr: u64) -> FrameRef {
    let pfn = mm.pte(addr).and_then(|p| p.pfn()).expect("mapped");
    mm.phys().frame_ref(pfn)
}

pub fn byte(mm: &Mm, addr: u64) -> u8 {
    let mut b = [0u8];
    mm.read(addr, &mut b).unwrap();
    b[0]
}

/// Starts of the invalidations in `calls` (hlist), as (start, end, event, owner).
pub fn starts(calls: &[Call]) -> Vec<(u64, u64, Event, Option<Owner>)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Start(r) => Some((r.start(), r.end(), r.event(), r.owner())),
            _ => None,
        })
        .collect()
}

pub fn intervals(calls: &[Call]) -> Vec<(u64, u64, Event, Option<Owner>)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Interval(r) => Some((r.start(), r.end(), r.event(), r.owner())),
            _ => None,
        })
        .collect()
}

/// Every start has a matching end later, and pairs do not interleave.
pub fn assert_pairs_nested(calls: &[Call]) {
    let mut open: Vec<Range> = Vec::new();
    for c in calls {
        match c {
            Call::Start(r) => open.push(*r),
            Call::End(r) => {
                let o = open.pop().expect("end without start");
                assert_eq!(o.start(), r.start());
                assert_eq!(o.end(), r.end());
                assert_eq!(o.event(), r.event());
            }
            _ => {}
        }
    }
    assert!(open.is_empty(), "starts without end: {open:?}");
}

/// A minimal HMM-style device mirror used to exercise the oracle:
/// a whole-address-space interval notifier, a device page table under the
/// device lock, and the read_begin / range_fault / read_retry loop. The
/// `broken_*` switches make it deliberately wrong.
pub struct MiniDevice {
    pub mm: MmGrab,
    pub pt: Mutex<std::collections::HashMap<u64, (FrameRef, bool)>>,
    pub sub: OnceLock<IntervalNotifier>,
    /// Ignore invalidations (keep stale entries).
    pub broken_ignore_invalidate: bool,
    /// Install without read_retry.
    pub broken_skip_retry: bool,
}

impl IntervalOps for MiniDeviceOps {
    fn invalidate(&self, sub: &IntervalNotifier, r: &Range, seq: u64) -> bool {
        let dev = self.0.upgrade();
        let Some(dev) = dev else { return true };
        let mut pt = if r.blockable() {
            dev.pt.lock().unwrap()
        } else {
            match dev.pt.try_lock() {
                Ok(g) => g,
                Err(_) => return false,
            }
        };
        sub.set_seq(seq);
        if !dev.broken_ignore_invalidate {
            pt.retain(|&a, _| !(a >= r.start() && a < r.end()));
        }
        true
    }
}

pub struct MiniDeviceOps(std::sync::Weak<MiniDevice>);

impl MiniDevice {
    pub fn new(mm: &Mm, ignore: bool, skip_retry: bool) -> Arc<MiniDevice> {
        let dev = Arc::new(MiniDevice {
            mm: mm.grab(),
            pt: Mutex::new(Default::default()),
            sub: OnceLock::new(),
            broken_ignore_invalidate: ignore,
            broken_skip_retry: skip_retry,
        });
        let sub = mm
            .subscriptions()
            .interval_insert(
                0,
                softmm::TASK_SIZE,
                Arc::new(MiniDeviceOps(Arc::downgrade(&dev))),
            )
            .unwrap();
        let _ = dev.sub.set(sub);
        dev
    }

    /// Faults one page into the device; `between` runs after range_fault and
    /// before the device lock is taken (where a racing invalidation lands).
    pub fn fault(
        &self,
        addr: u64,
        write: bool,
        between: &mut dyn FnMut(),
    ) -> Result<(), softmm::Error> {
        let sub = self.sub.get().unwrap();
        let mm = self.mm.get()?;
        loop {
            let seq = sub.read_begin().unwrap();
            let mut range = softmm::HmmRange::new(sub, seq, addr, addr + P);
            range.fault = true;
            range.write = write;
            let r = {
                let g = mm.mmap_read();
                g.range_fault(&mut range)
            };
            match r {
                Err(softmm::Error::Busy) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            between();
            let mut pt = self.pt.lock().unwrap();
            if !self.broken_skip_retry && sub.read_retry(seq) {
                continue;
            }
            let p = range.pfns[0];
            pt.insert(addr, (p.frame.unwrap(), p.write));
            return Ok(());
        }
    }

    /// A device access through its own page table, checked by the oracle.
    /// `Ok(false)`: no entry (the device would fault).
    pub fn access(&self, addr: u64, write: bool) -> Result<bool, Box<softmm::Violation>> {
        let pt = self.pt.lock().unwrap();
        let Some(&(frame, w)) = pt.get(&addr) else {
            return Ok(false);
        };
        if write && !w {
            return Ok(false);
        }
        let phys = self.mm.phys().clone();
        phys.oracle().check_access(&self.mm, addr, frame, write)?;
        Ok(true)
    }
}

/// Every frame's mapcount equals the PTEs mapping it across live address
/// spaces, and its refcount is mappings plus pins.
pub fn check_accounting(phys: &PhysMem, mms: &[&Mm]) {
    let mut maps: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for mm in mms {
        for (_, pte) in mm.ptes() {
            if let Some(pfn) = pte.pfn().filter(|&p| p != softmm::ZERO_PFN) {
                if !matches!(pte.kind, softmm::PteKind::Swap { .. }) {
                    *maps.entry(pfn).or_default() += 1;
                }
            }
        }
    }
    for (pfn, m, pins, refs) in phys.frame_counts() {
        assert_eq!(
            m,
            maps.get(&pfn).copied().unwrap_or(0),
            "mapcount of frame {pfn}"
        );
        assert_eq!(refs, m + pins, "refcount of frame {pfn}");
        assert!(refs > 0, "allocated frame {pfn} without references (leak)");
    }
    for pfn in maps.keys() {
        assert!(phys.mapcount(*pfn) > 0, "a PTE maps free frame {pfn}");
    }
    assert_eq!(phys.stats().underflows, 0);
}
