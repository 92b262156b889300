//! `mmun stress`: a randomized concurrent workload on softmm address
//! spaces with all four mirrors attached and the oracle on.
//!
//! Every thread draws its operations from its own generator seeded from
//! `--seed` and its index, so the sequence each thread issues is a function
//! of the seed; with `--threads 1` the whole run is deterministic.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrors::{DmirrorError, MirrorError, MrCache, ShadowMmu};
use mmu_notifier::{sync, Event};
use softmm::{MapKind, Mm, PhysMem, Prot, PAGE_SIZE};

use crate::rng::Rng;
use crate::trace::{self, Monitor};
use crate::world::{
    self, Space, FILE, HUGE, HUGETLB, HUGETLB_PAGES, HUGE_PAGES, PRIV, PRIV_PAGES, SCRATCH, SHARED,
    SHARED_PAGES,
};

const P: u64 = PAGE_SIZE;

macro_rules! kinds {
    ($($k:ident = $name:literal, $w:literal, $primary:literal;)*) => {
        /// The operations of the mix.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind { $($k),* }
        impl Kind {
            /// Every kind, in table order.
            pub const ALL: &'static [Kind] = &[$(Kind::$k),*];
            /// Parses a kind from its variant name, case-insensitively.
            pub fn parse(name: &str) -> Option<Kind> {
                Kind::ALL.iter().copied().find(|k| format!("{k:?}").eq_ignore_ascii_case(name))
            }
            /// Name in the summary table.
            pub fn name(self) -> &'static str { match self { $(Kind::$k => $name),* } }
            fn weight(self) -> u64 { match self { $(Kind::$k => $w),* } }
            /// A primary-MMU operation (the only ones `bench` runs).
            pub fn is_primary(self) -> bool { match self { $(Kind::$k => $primary),* } }
        }
    };
}

kinds! {
    Remap = "munmap+mmap", 4, true;
    Mremap = "mremap move+grow", 2, true;
    Mprotect = "mprotect", 3, true;
    DontNeed = "madvise DONTNEED", 3, true;
    Free = "madvise FREE", 2, true;
    CpuWrite = "cpu write fault", 12, true;
    CpuRead = "cpu read fault", 8, true;
    Fork = "fork+child+exit", 1, true;
    Ksm = "ksm merge", 1, true;
    Migrate = "page migration", 2, true;
    SwapOut = "reclaim swap-out", 2, true;
    Age = "reclaim aging", 2, true;
    ClearYoung = "idle clear_young", 1, true;
    TestYoung = "test_young", 1, true;
    SoftDirty = "soft-dirty clear", 1, true;
    Writeback = "writeback", 1, true;
    OomChild = "fork+oom reap", 1, true;
    KvmFault = "kvm fault+access", 8, false;
    DevRead = "dmirror read", 4, false;
    DevWrite = "dmirror write", 3, false;
    DevMigrate = "dmirror migrate to dev", 2, false;
    DevMigrateBack = "dmirror migrate to sys", 1, false;
    DevSnapshot = "dmirror snapshot", 1, false;
    DevExclusive = "dmirror exclusive", 1, false;
    TlbAccess = "sva tlb access", 8, false;
    RegLookup = "regcache lookup+use", 8, false;
    Attach = "mirror attach+use+detach", 1, false;
    ChildMirror = "fork+mirror vs exit", 1, false;
    HugeRemap = "THP block remap+fault", 1, true;
    HugeAdvice = "madvise (no)hugepage", 1, true;
    Collapse = "khugepaged collapse", 1, true;
    Hugetlb = "hugetlb page ops", 1, true;
}

/// Why an operation did not succeed.
pub enum Fail {
    /// An outcome the concurrent mix makes legitimate (a racing unmap, a
    /// protection change, a busy retry).
    Expected,
    /// A coherence violation.
    Violation(String),
}

impl From<softmm::Error> for Fail {
    fn from(_: softmm::Error) -> Self {
        Fail::Expected
    }
}

impl From<MirrorError> for Fail {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::Violation(v) => Fail::Violation(v.to_string()),
            _ => Fail::Expected,
        }
    }
}

impl From<DmirrorError> for Fail {
    fn from(e: DmirrorError) -> Self {
        match e {
            DmirrorError::Violation => Fail::Violation("device mirror access".into()),
            _ => Fail::Expected,
        }
    }
}

fn region(rng: &mut Rng) -> (u64, u64) {
    match rng.below(13) {
        0 | 1 => (SHARED, SHARED_PAGES),
        2 => (FILE, SHARED_PAGES),
        3 | 4 => (HUGE, HUGE_PAGES),
        5 => (HUGETLB, HUGETLB_PAGES),
        _ => (PRIV, PRIV_PAGES),
    }
}

/// A page and a page count inside one region (inside its first `hot`
/// pages when the space sets them).
fn spot(rng: &mut Rng, hot: Option<u64>) -> (u64, u64, u64) {
    let (base, pages) = region(rng);
    let i = rng.below(hot.map_or(pages, |h| h.clamp(1, pages)));
    let n = (1 + rng.below(4)).min(pages - i);
    (base, base + i * P, n)
}

/// A 2 MiB block of the THP region.
fn huge_block(rng: &mut Rng) -> u64 {
    HUGE + rng.below(HUGE_PAGES / softmm::HPAGE_PMD_NR) * softmm::PMD_SIZE
}

fn remap_kind(sp: &Space, base: u64, addr: u64) -> MapKind {
    match base {
        SHARED => MapKind::AnonShared,
        FILE => MapKind::File {
            file: sp.file.clone(),
            pgoff: (addr - FILE) / P,
        },
        _ => MapKind::AnonPrivate,
    }
}

fn child_ops(child: &Mm, rng: &mut Rng) {
    for _ in 0..3 {
        let a = PRIV + rng.below(PRIV_PAGES) * P;
        let _ = if rng.below(2) == 0 {
            child.write(a, &[rng.below(256) as u8])
        } else {
            child.read(a, &mut [0u8]).map(|_| ())
        };
    }
}

/// Runs one operation of `kind` on `sp`.
pub fn exec(kind: Kind, sp: &Space, rng: &mut Rng) -> Result<(), Fail> {
    let mm = &sp.mm;
    let (base, addr, n) = spot(rng, sp.hot);
    let len = n * P;
    let write = rng.below(2) == 0;
    match kind {
        Kind::Remap => {
            mm.munmap(addr, len)?;
            mm.mmap_fixed(addr, len, Prot::RW, remap_kind(sp, base, addr))?;
        }
        Kind::Mremap => {
            // One page: VMAs fragment under mprotect and partial unmaps, and
            // mremap needs its range inside one VMA.
            let a = PRIV + rng.below(sp.hot.unwrap_or(PRIV_PAGES)) * P;
            let scratch = SCRATCH + (a - PRIV);
            mm.mremap_fixed(a, P, P, scratch)?;
            // Grow in place (when the next scratch page is free) and shrink
            // back, then move home.
            if mm.mremap(scratch, P, 2 * P, false).is_ok() {
                mm.mremap(scratch, 2 * P, P, false)?;
            }
            mm.mremap_fixed(scratch, P, P, a)?;
        }
        Kind::Mprotect => {
            let prot = match rng.below(10) {
                0 => Prot::NONE,
                1..=3 => Prot::READ,
                _ => Prot::RW,
            };
            mm.mprotect(addr, len, prot)?;
        }
        Kind::DontNeed => mm.madvise_dontneed(addr, len)?,
        Kind::Free => mm.madvise_free(addr, len)?,
        Kind::CpuWrite => mm.write(addr + rng.below(P - 8), &rng.next_u64().to_le_bytes())?,
        Kind::CpuRead => mm.read(addr + rng.below(P - 8), &mut [0u8; 8])?,
        Kind::Fork => {
            let child = mm.fork()?;
            child_ops(&child, rng);
            child.exit();
        }
        Kind::OomChild => {
            let child = mm.fork()?;
            child_ops(&child, rng);
            let _ = child.oom_reap();
            child_ops(&child, rng);
            child.exit();
        }
        Kind::Ksm => {
            mm.ksm_merge(PRIV, PRIV_PAGES * P)?;
        }
        Kind::Migrate => {
            mm.migrate_pages(addr, len)?;
        }
        Kind::SwapOut => {
            mm.swap_out(addr, len)?;
        }
        Kind::Age => {
            mm.age(addr, len)?;
        }
        Kind::ClearYoung => {
            mm.clear_young(addr, len)?;
        }
        Kind::TestYoung => {
            mm.test_young(addr);
        }
        Kind::SoftDirty => mm.clear_soft_dirty(),
        Kind::Writeback => {
            mm.writeback(addr, len)?;
        }
        Kind::HugeRemap => {
            // A fresh MADV_HUGEPAGE block (other operations fragment the
            // region's VMAs), faulted in as a THP when frames allow.
            let b = huge_block(rng);
            mm.munmap(b, softmm::PMD_SIZE)?;
            mm.mmap_fixed(b, softmm::PMD_SIZE, Prot::RW, MapKind::AnonPrivate)?;
            mm.madvise_hugepage(b, softmm::PMD_SIZE)?;
            mm.write(
                b + rng.below(softmm::PMD_SIZE - 8),
                &rng.next_u64().to_le_bytes(),
            )?;
        }
        Kind::HugeAdvice => {
            let a = HUGE + rng.below(HUGE_PAGES - 4) * P;
            mm.madvise_nohugepage(a, len)?;
            mm.madvise_hugepage(a, len)?;
        }
        Kind::Collapse => {
            mm.collapse(huge_block(rng))?;
        }
        Kind::Hugetlb => {
            // Whole hugetlb pages (the 4 KiB operations of the mix on this
            // region are refused: they would split one).
            let h = softmm::PMD_SIZE;
            let p = HUGETLB + rng.below(HUGETLB_PAGES / softmm::HPAGE_PMD_NR) * h;
            match rng.below(3) {
                0 => {
                    mm.munmap(p, h)?;
                    mm.mmap_fixed(p, h, Prot::RW, MapKind::Hugetlb { shared: false })?;
                    mm.write(p + rng.below(h - 8), &rng.next_u64().to_le_bytes())?;
                }
                1 => mm.madvise_dontneed(p, h)?,
                _ => {
                    let prot = if rng.below(2) == 0 {
                        Prot::READ
                    } else {
                        Prot::RW
                    };
                    mm.mprotect(p, h, prot)?;
                }
            }
        }
        _ => return exec_secondary(kind, sp, rng, addr, n, write),
    }
    Ok(())
}

fn exec_secondary(
    kind: Kind,
    sp: &Space,
    rng: &mut Rng,
    addr: u64,
    n: u64,
    write: bool,
) -> Result<(), Fail> {
    let Some(m) = &sp.mirrors else {
        return Ok(());
    };
    let len = n * P;
    match kind {
        Kind::KvmFault => trace::span("kvm fault..retry", || {
            m.kvm.fault(addr, write)?;
            if write {
                m.kvm.write(addr, rng.below(256) as u8)?;
            } else {
                m.kvm.read(addr)?;
            }
            Ok::<_, Fail>(())
        })?,
        Kind::DevRead => {
            trace::span("dmirror read (fault..retry)", || m.dev.read(addr, n))?;
        }
        Kind::DevWrite => {
            let data = vec![rng.below(256) as u8; len as usize];
            trace::span("dmirror write (fault..retry)", || m.dev.write(addr, &data))?;
        }
        Kind::DevMigrate => {
            m.dev.migrate_to_device(addr, n)?;
        }
        Kind::DevMigrateBack => {
            m.dev.migrate_to_system(addr, n)?;
        }
        Kind::DevSnapshot => {
            m.dev.snapshot(addr, n)?;
        }
        Kind::DevExclusive => {
            m.dev.exclusive(addr, n)?;
        }
        Kind::TlbAccess => {
            let store = write.then(|| rng.below(256) as u8);
            m.tlb.access(addr, store)?;
        }
        Kind::RegLookup => {
            let reg = m.cache.get(addr, len, write)?;
            m.cache.check(&reg, addr + rng.below(len), write)?;
        }
        Kind::Attach => {
            // Registration and unregistration (of a notifier and of an
            // interval notifier) racing the other threads' invalidations.
            let kvm = ShadowMmu::attach(sp.mm.grab())?;
            kvm.fault(addr, write)?;
            kvm.read(addr)?;
            let cache = MrCache::new(sp.mm.grab(), 4);
            let reg = cache.get(addr, len, write)?;
            cache.check(&reg, addr + rng.below(len), write)?;
        }
        Kind::ChildMirror => {
            // Exit racing a secondary that is still using the address space
            // and then unregisters (751efd86, 3ad3d901/d34883d4).
            let child = sp.mm.fork()?;
            let kvm = ShadowMmu::attach(child.grab())?;
            let a = PRIV + rng.below(sp.hot.unwrap_or(PRIV_PAGES)) * P;
            kvm.fault(a, write)?;
            let used = sync::thread::scope(|scope| {
                scope.spawn(move || child.exit());
                let used = kvm.read(a).map(|_| ());
                drop(kvm);
                used
            });
            if let Err(MirrorError::Violation(v)) = used {
                return Err(Fail::Violation(v.to_string()));
            }
        }
        _ => unreachable!("primary kinds are handled by exec"),
    }
    Ok(())
}

/// Picks a kind by weight, among the primary kinds only if asked and never
/// a skipped one.
pub fn pick(rng: &mut Rng, primary_only: bool, skip: &[Kind]) -> Kind {
    let kinds = Kind::ALL
        .iter()
        .filter(|k| (!primary_only || k.is_primary()) && !skip.contains(k));
    let total: u64 = kinds.clone().map(|k| k.weight()).sum();
    let mut x = rng.below(total);
    for k in kinds {
        if x < k.weight() {
            return *k;
        }
        x -= k.weight();
    }
    unreachable!("weights sum to total")
}

/// Frames `mmun stress` needs per address space: the zero page, the shared
/// file each space maps, and room for faults.
pub const MIN_FRAMES_PER_SPACE: usize = 64;

/// Settings of one stress run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Stop after this long (if set).
    pub seconds: Option<u64>,
    /// Stop after this many operations (if set).
    pub ops: Option<u64>,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Seed of every thread's generator.
    pub seed: u64,
    /// Address spaces.
    pub spaces: usize,
    /// Frames of the machine.
    pub frames: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Operation kinds left out of the mix.
    pub skip: Vec<Kind>,
}

/// The outcome of a run.
pub struct Report {
    /// The summary table.
    pub table: String,
    /// Coherence violations (oracle count plus violations reported by
    /// mirrors).
    pub violations: u64,
    /// Frames or swap slots left after teardown, or refcount underflows.
    pub leaks: Vec<String>,
    /// First violation messages.
    pub first: Vec<String>,
    /// Sleeping locks taken in non-blockable callbacks (checked in debug
    /// builds only).
    pub sleeps_in_non_blockable: u64,
}

#[derive(Default)]
struct Counters {
    ops: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    violations: AtomicU64,
    first: std::sync::Mutex<Vec<String>>,
}

/// Runs the workload.
pub fn run(s: &Settings) -> Report {
    let phys = PhysMem::new(s.frames);
    let monitor = Arc::new(Monitor::default());
    if crate::trace::is_enabled() {
        phys.oracle()
            .set_observer(Some(Arc::new(trace::CheckTracer)));
    }
    let spaces: Vec<Space> = (0..s.spaces.max(1))
        .map(|i| world::space(&phys, &monitor, i as u64, true))
        .collect();
    let counters = Counters {
        ops: Kind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        errors: Kind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        ..Counters::default()
    };
    let budget = s.ops.unwrap_or(if s.seconds.is_some() {
        u64::MAX
    } else {
        100_000
    });
    let deadline = s.seconds.map(|x| Instant::now() + Duration::from_secs(x));
    let issued = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let bar = crate::progress::bar(s.progress, s.seconds, budget);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..s.threads.max(1) {
            let (spaces, counters, issued, stop, bar) = (&spaces, &counters, &issued, &stop, &bar);
            scope.spawn(move || {
                let mut rng = Rng::new(s.seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                loop {
                    if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    let i = issued.fetch_add(1, Ordering::Relaxed);
                    if i >= budget {
                        break;
                    }
                    let kind = pick(&mut rng, false, &s.skip);
                    let sp = &spaces[rng.below(spaces.len() as u64) as usize];
                    let idx = Kind::ALL.iter().position(|k| *k == kind).expect("listed");
                    counters.ops[idx].fetch_add(1, Ordering::Relaxed);
                    match exec(kind, sp, &mut rng) {
                        Ok(()) => {}
                        Err(Fail::Expected) => {
                            counters.errors[idx].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Fail::Violation(msg)) => {
                            counters.violations.fetch_add(1, Ordering::Relaxed);
                            let mut f = counters.first.lock().unwrap_or_else(|e| e.into_inner());
                            if f.len() < 4 {
                                f.push(format!("{}: {msg}", kind.name()));
                            }
                        }
                    }
                    if i % 256 == 0 {
                        crate::progress::tick(bar, i);
                    }
                }
            });
        }
    });
    crate::progress::finish(&bar);
    let elapsed = started.elapsed();
    let total_ops: u64 = counters.ops.iter().map(|c| c.load(Ordering::Relaxed)).sum();

    let mut t = String::new();
    let _ = writeln!(
        t,
        "mmun stress: seed {}, {} threads, {} address spaces, {} frames: {} operations in {:.2} s ({:.0} ops/s)\n",
        s.seed,
        s.threads,
        spaces.len(),
        s.frames,
        total_ops,
        elapsed.as_secs_f64(),
        total_ops as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    let _ = writeln!(t, "{:<26} {:>10} {:>10}", "operation", "count", "errors");
    for (i, k) in Kind::ALL.iter().enumerate() {
        let _ = writeln!(
            t,
            "{:<26} {:>10} {:>10}",
            k.name(),
            counters.ops[i].load(Ordering::Relaxed),
            counters.errors[i].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(t, "\n{:<26} {:>10}", "invalidations by event", "count");
    for e in Event::ALL {
        let _ = writeln!(t, "{:<26} {:>10}", format!("{e:?}"), monitor.count(e));
    }
    let (mut faults, mut retries) = (0u64, 0u64);
    let mut sec = String::new();
    for sp in &spaces {
        faults += sp.mm.op_count(softmm::Op::Fault);
        if let Some(m) = &sp.mirrors {
            let ks = m.kvm.stats();
            let (_, dfaults, dretries, _) = m.dev.counters();
            let cs = m.cache.stats();
            retries +=
                ks.retries.load(Ordering::Relaxed) + dretries + cs.retries.load(Ordering::Relaxed);
            faults += ks.faults.load(Ordering::Relaxed) + dfaults;
            let _ = writeln!(
                sec,
                "mm{}: kvm faults {} retries {} zapped {}; dmirror faults {} retries {}; tlb walks {} page requests {} flushes {}; regcache hits {} misses {} invalidated {} evicted {}",
                sp.mm.id(),
                ks.faults.load(Ordering::Relaxed),
                ks.retries.load(Ordering::Relaxed),
                ks.zapped.load(Ordering::Relaxed),
                dfaults,
                dretries,
                m.tlb.stats().walks.load(Ordering::Relaxed),
                m.tlb.stats().page_requests.load(Ordering::Relaxed),
                m.tlb.stats().flushes.load(Ordering::Relaxed),
                cs.hits.load(Ordering::Relaxed),
                cs.misses.load(Ordering::Relaxed),
                cs.invalidated.load(Ordering::Relaxed),
                cs.evicted.load(Ordering::Relaxed),
            );
        }
    }
    let oracle = phys.oracle();
    let violations = oracle
        .violation_count()
        .max(counters.violations.load(Ordering::Relaxed));
    let _ = writeln!(t, "\n{:<26} {:>10}", "faults (primary+secondary)", faults);
    let _ = writeln!(t, "{:<26} {:>10}", "secondary fault retries", retries);
    let _ = writeln!(t, "{:<26} {:>10}", "oracle checks", oracle.checks());
    // Huge pages: allocated (THPs by faults and collapses, hugetlb pages),
    // PMD splits and collapses in the parent address spaces.
    let count = |op| spaces.iter().map(|sp| sp.mm.op_count(op)).sum::<u64>();
    let _ = writeln!(
        t,
        "{:<26} {:>10}",
        "huge pages allocated",
        phys.stats().huge_allocs
    );
    let _ = writeln!(
        t,
        "{:<26} {:>10}",
        "PMD splits",
        count(softmm::Op::SplitHugePmd)
    );
    let _ = writeln!(
        t,
        "{:<26} {:>10}",
        "THP collapses",
        count(softmm::Op::Collapse)
    );
    let _ = writeln!(t, "{:<26} {:>10}", "violations", violations);
    // The sleep check of the debug builds (always 0 in release builds).
    let sleeps: u64 = spaces
        .iter()
        .map(|sp| {
            sp.mm
                .subscriptions()
                .diagnostics()
                .count(mmu_notifier::Warning::SleepInNonBlockable)
        })
        .sum();
    if cfg!(debug_assertions) {
        let _ = writeln!(t, "{:<26} {:>10}", "sleeps in non-blockable", sleeps);
    }
    let _ = write!(t, "\n{sec}");
    let mut first: Vec<String> = oracle.violations().iter().map(|v| v.to_string()).collect();
    first.extend(counters.first.into_inner().unwrap_or_default());

    // Teardown: mirrors first, then the address spaces; nothing may remain.
    drop(spaces);
    let leaks = leaks_after_teardown(&phys);
    let st = phys.stats();
    let _ = writeln!(
        t,
        "{:<26} {:>10}",
        "frames leaked",
        st.in_use.saturating_sub(1) + st.swap_slots + st.underflows
    );
    Report {
        table: t,
        violations,
        leaks,
        first,
        sleeps_in_non_blockable: sleeps,
    }
}

/// What a machine still holds once every address space and mirror built by
/// [`world::space`] is gone: frames other than the zero page, swap slots,
/// and reference-count underflows (double frees). Empty when nothing leaked.
pub fn leaks_after_teardown(phys: &PhysMem) -> Vec<String> {
    let st = phys.stats();
    let mut leaks = Vec::new();
    if st.in_use != 1 {
        leaks.push(format!(
            "{} frames still in use after teardown",
            st.in_use.saturating_sub(1)
        ));
    }
    if st.swap_slots != 0 {
        leaks.push(format!("{} swap slots still in use", st.swap_slots));
    }
    if st.underflows != 0 {
        leaks.push(format!(
            "{} reference-count underflows (double frees)",
            st.underflows
        ));
    }
    leaks
}

/// Runs only primary operations for `ops` operations on one address space
/// (with or without the mirrors) and returns the elapsed time: one sample of
/// `mmun bench`.
pub fn primary_only(seed: u64, ops: u64, with_mirrors: bool) -> Duration {
    let phys = PhysMem::new(8192);
    let monitor = Arc::new(Monitor::default());
    let mut sp = world::space(&phys, &monitor, 0, with_mirrors);
    if with_mirrors {
        // Give the mirrors something to invalidate: populate them.
        let m = sp.mirrors.as_ref().expect("attached");
        for i in 0..PRIV_PAGES {
            let a = PRIV + i * P;
            let _ = sp.mm.write(a, &[1]);
            let _ = m.kvm.fault(a, false);
            let _ = m.tlb.access(a, None);
        }
        let _ = m.dev.read(PRIV, PRIV_PAGES);
    }
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    for _ in 0..ops {
        let kind = pick(&mut rng, true, &[]);
        let _ = exec(kind, &sp, &mut rng);
    }
    let d = start.elapsed();
    sp.mirrors = None;
    d
}
