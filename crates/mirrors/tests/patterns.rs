//! The KVM, SVA and registration-cache patterns on softmm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mirrors::{FramePrimary, MirrorError, MrCache, Primary, SecondaryTlb, ShadowMmu};
use mmu_notifier::SubscriptionsRef;
use softmm::{FrameRef, MapKind, Mm, MmGrab, PhysMem, PinnedPages, Prot, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn machine() -> (Arc<PhysMem>, Mm) {
    let phys = PhysMem::new(1024);
    let mm = Mm::new(&phys);
    (phys, mm)
}

/// A primary that runs a hook right after `fault_page` resolved a page:
/// where a racing invalidation lands in the KVM fault path.
struct Hooked {
    mm: MmGrab,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Primary for Hooked {
    type Pinned = PinnedPages;
    type Watch = ();
    fn subscriptions(&self) -> &SubscriptionsRef {
        self.mm.subscriptions()
    }
    fn watch(&self, _start: u64, _len: u64) -> mirrors::Result<()> {
        Ok(())
    }
    fn pin(&self, start: u64, len: u64, write: bool) -> mirrors::Result<PinnedPages> {
        Primary::pin(&self.mm, start, len, write)
    }
}

impl FramePrimary for Hooked {
    fn fault_page(&self, addr: u64, write: bool) -> mirrors::Result<(FrameRef, bool)> {
        let r = self.mm.fault_page(addr, write);
        if let Some(h) = self.hook.lock().unwrap().take() {
            h();
        }
        r
    }
    fn walk(&self, addr: u64) -> Option<(FrameRef, bool)> {
        self.mm.walk(addr)
    }
    fn frame_of(&self, pfn: u64) -> FrameRef {
        self.mm.frame_of(pfn)
    }
    fn pinned_frame(&self, p: &PinnedPages, addr: u64) -> Option<FrameRef> {
        self.mm.pinned_frame(p, addr)
    }
    fn check_access(&self, addr: u64, f: FrameRef, write: bool) -> mirrors::Result<()> {
        self.mm.check_access(addr, f, write)
    }
    fn check_pinned(&self, p: &PinnedPages, addr: u64, write: bool) -> mirrors::Result<()> {
        self.mm.check_pinned(p, addr, write)
    }
    fn dma_read(&self, f: FrameRef, off: usize, buf: &mut [u8]) -> mirrors::Result<()> {
        self.mm.dma_read(f, off, buf)
    }
    fn dma_write(&self, f: FrameRef, off: usize, data: &[u8]) -> mirrors::Result<()> {
        self.mm.dma_write(f, off, data)
    }
}

#[test]
fn kvm_fault_racing_an_invalidation_retries() {
    let (phys, mm) = machine();
    let a = mm.mmap(P, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(a, &[1]).unwrap();
    let child = mm.fork().unwrap(); // COW-shared now
    let mm2 = mm.clone();
    let hooked = Hooked {
        mm: mm.grab(),
        hook: Mutex::new(Some(Box::new(move || mm2.write(a, &[2]).unwrap()))),
    };
    let kvm = ShadowMmu::attach(hooked).unwrap();
    // The read fault resolves the shared frame; the hook's COW break then
    // invalidates it before the fault takes mmu_lock: the fault retries.
    kvm.fault(a, false).unwrap();
    assert_eq!(kvm.stats().retries.load(Ordering::Relaxed), 1);
    assert_eq!(kvm.read(a).unwrap(), Some(2));
    assert_eq!(phys.oracle().violation_count(), 0);
    drop(child);
}

#[test]
fn kvm_change_pte_updates_only_inside_an_invalidation() {
    let (phys, mm) = machine();
    let a = mm.mmap(8 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(a + P, &[4]).unwrap();
    let kvm = ShadowMmu::attach(mm.grab()).unwrap();
    kvm.fault(a + P, true).unwrap();
    let frame = mm.pte(a + P).unwrap().pfn().unwrap();
    let ro = mmu_notifier::PteValue {
        pfn: frame,
        writable: false,
    };
    // Outside an invalidation: ignored (the SPTE stays writable).
    mm.primary_subscriptions().change_pte(a + P, ro);
    assert_eq!(kvm.stats().change_pte.load(Ordering::Relaxed), 0);
    assert!(kvm.write(a + P, 5).unwrap());
    // Inside one (here over another range), the SPTE is repointed read-only.
    let other = mmu_notifier::Range::new(a + 4 * P, a + 5 * P, mmu_notifier::Event::Clear).unwrap();
    let inv = mm.primary_subscriptions().invalidate_range_start(other);
    assert_eq!(kvm.invalidate_in_progress(), 1);
    mm.primary_subscriptions().change_pte(a + P, ro);
    inv.end();
    assert_eq!(kvm.stats().change_pte.load(Ordering::Relaxed), 1);
    assert!(!kvm.write(a + P, 6).unwrap(), "read-only now");
    assert_eq!(kvm.read(a + P).unwrap(), Some(5));
    // In the primary's own COW and KSM paths the start has already zapped
    // the SPTE, so change_pte finds nothing (why Linux later removed it).
    mm.write(a + 2 * P, &[5]).unwrap();
    kvm.fault(a + 2 * P, false).unwrap();
    assert_eq!(mm.ksm_merge(a, 8 * P).unwrap(), 1);
    assert_eq!(kvm.read(a + 2 * P).unwrap(), None);
    assert_eq!(kvm.stats().change_pte.load(Ordering::Relaxed), 1);
    assert_eq!(phys.oracle().violation_count(), 0);
}

#[test]
fn kvm_young_callbacks_and_release() {
    let (_phys, mm) = machine();
    let a = mm.mmap(2 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    mm.write(a, &[1]).unwrap();
    let kvm = ShadowMmu::attach(mm.grab()).unwrap();
    kvm.fault(a, true).unwrap();
    assert_eq!(mm.age(a, P).unwrap(), 1); // PTE young
    assert_eq!(mm.age(a, P).unwrap(), 0); // both cleared
    assert!(kvm.write(a, 9).unwrap()); // the guest touches it
    assert!(mm.test_young(a), "test_young asks the SPTE");
    assert_eq!(
        mm.age(a, P).unwrap(),
        1,
        "the secondary's accessed bit counts"
    );
    let grab = mm.grab();
    drop(mm); // exit: release zaps everything
    assert_eq!(kvm.spte_count(), 0);
    assert!(matches!(kvm.fault(a, false), Err(MirrorError::Released)));
    assert!(grab.is_exited());
}

#[test]
fn secondary_tlb_is_flushed_by_every_primary_flush() {
    let (phys, mm) = machine();
    let a = mm.mmap(4 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let tlb = SecondaryTlb::bind(mm.grab()).unwrap();
    assert_eq!(tlb.access(a, Some(5)).unwrap(), 5); // page request + walk
    assert_eq!(tlb.stats().page_requests.load(Ordering::Relaxed), 1);
    assert_eq!(tlb.access(a, None).unwrap(), 5); // hit
    assert_eq!(tlb.stats().hits.load(Ordering::Relaxed), 1);
    // mprotect read-only: flushed; a write needs a page request, which fails.
    mm.mprotect(a, P, Prot::READ).unwrap();
    assert!(tlb.is_empty());
    assert!(matches!(
        tlb.access(a, Some(1)),
        Err(MirrorError::Primary(softmm::Error::Protection { .. }))
    ));
    assert_eq!(tlb.access(a, None).unwrap(), 5);
    // COW after fork: the write-protect flush empties the TLB.
    mm.mprotect(a, P, Prot::RW).unwrap();
    let child = mm.fork().unwrap();
    assert!(tlb.is_empty());
    assert_eq!(tlb.access(a, Some(6)).unwrap(), 6);
    assert_eq!(child.read_u64(a).unwrap() & 0xff, 5);
    mm.munmap(a, 4 * P).unwrap();
    assert!(tlb.is_empty());
    assert!(tlb.access(a, None).is_err());
    assert_eq!(phys.oracle().violation_count(), 0);
}

#[test]
fn regcache_hits_invalidations_and_lru() {
    let (_phys, mm) = machine();
    let a = mm.mmap(8 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let cache = MrCache::new(mm.grab(), 2);
    let r = cache.get(a, 2 * P, true).unwrap();
    cache.check(&r, a + P, true).unwrap();
    assert_eq!(cache.get(a + 10, 100, false).unwrap().id(), r.id());
    // madvise DONTNEED under it: invalidated, a new lookup registers anew.
    mm.madvise_dontneed(a, P).unwrap();
    assert!(!r.is_valid());
    assert!(matches!(
        cache.check(&r, a, false),
        Err(MirrorError::Released)
    ));
    let r2 = cache.get(a, 2 * P, true).unwrap();
    assert_ne!(r2.id(), r.id());
    // mprotect read-only invalidates a writable registration.
    mm.mprotect(a, P, Prot::READ).unwrap();
    assert!(!r2.is_valid());
    mm.mprotect(a, P, Prot::RW).unwrap();
    // LRU: three registrations, limit two.
    let x = cache.get(a + 4 * P, P, false).unwrap();
    let y = cache.get(a + 5 * P, P, false).unwrap();
    let _ = cache.get(a + 4 * P, P, false).unwrap(); // x used again
    let z = cache.get(a + 6 * P, P, false).unwrap();
    assert!(x.is_valid() && !y.is_valid() && z.is_valid());
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.stats().evicted.load(Ordering::Relaxed), 1);
    // mremap moves the memory: the registration goes.
    mm.mremap(a + 6 * P, P, 3 * P, true).unwrap();
    assert!(!z.is_valid());
    assert!(cache.get(a, 0, false).is_err());
}

/// Found by cargo-fuzz (the scenario target): an access through a
/// registration at an address it does not cover was reported as a coherence
/// violation (the oracle found the address's frame not pinned) instead of as
/// bad input.
#[test]
fn regcache_check_outside_the_registration_is_an_error() {
    let (phys, mm) = machine();
    let a = mm.mmap(4 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let cache = MrCache::new(mm.grab(), 4);
    let r = cache.get(a, 2 * P, true).unwrap();
    for addr in [a - 1, a + 2 * P, a + 3 * P, u64::MAX] {
        let e = cache.check(&r, addr, true).unwrap_err();
        assert!(
            matches!(e, MirrorError::OutOfRange { addr: x, start, end } if x == addr && start == a && end == a + 2 * P),
            "{e}"
        );
    }
    cache.check(&r, a + 2 * P - 1, true).unwrap();
    assert_eq!(phys.oracle().violation_count(), 0);
}

/// Threads looking up and using registrations while others unmap, remap and
/// discard the memory under them: no lookup ever returns a registration that
/// disagrees with the address space.
#[test]
fn regcache_lookups_racing_unmaps_are_never_stale() {
    let (phys, mm) = machine();
    const PAGES: u64 = 16;
    let base = mm.mmap(PAGES * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    let cache = Arc::new(MrCache::new(mm.grab(), 8));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = AtomicU64::new(0);
    let churn = Arc::new(churn);
    let primary = {
        let mm = mm.clone();
        let (stop, churn) = (stop.clone(), churn.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pg = base + (i % PAGES) * P;
                match i % 3 {
                    0 => {
                        mm.munmap(pg, P).unwrap();
                        mm.mmap_fixed(pg, P, Prot::RW, MapKind::AnonPrivate)
                            .unwrap();
                    }
                    1 => mm.madvise_dontneed(pg, P).unwrap(),
                    _ => mm.write(pg, &[i as u8]).unwrap(),
                }
                i += 1;
                churn.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut ops = 0u64;
    let mut checked = 0u64;
    while ops < 20_000 || churn.load(Ordering::Relaxed) < 2_000 {
        let pg = base + (ops * 5 % PAGES) * P;
        let Ok(r) = cache.get(pg, P, true) else {
            continue;
        };
        match cache.check(&r, pg, true) {
            Ok(()) => checked += 1,
            Err(MirrorError::Released) => {} // invalidated since: look up again
            Err(e) => panic!("stale registration: {e}"),
        }
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);
    primary.join().unwrap();
    assert!(checked > 0);
    assert_eq!(phys.oracle().violation_count(), 0);
}

/// An interval mirror that takes a sleeping lock in every callback.
struct Sleepy(mmu_notifier::CheckedMutex<()>);

impl mmu_notifier::IntervalOps for Sleepy {
    fn invalidate(
        &self,
        sub: &mmu_notifier::IntervalNotifier,
        _: &mmu_notifier::Range,
        seq: u64,
    ) -> bool {
        let _g = self.0.lock(); // wrong in a non-blockable range: may sleep
        sub.set_seq(seq);
        true
    }
}

/// The sleep check runs for the mirrors: an OOM reap (non-blockable
/// invalidations) with the four reference mirrors attached and using their
/// translations reports nothing, while a mirror that takes a sleeping lock
/// in its callback is reported (debug builds, where the check is on).
#[test]
fn sleeping_in_a_non_blockable_callback_is_reported_and_the_mirrors_do_not() {
    use mmu_notifier::Warning::SleepInNonBlockable;
    if !cfg!(debug_assertions) {
        return;
    }
    for bad in [false, true] {
        let (phys, mm) = machine();
        let a = mm.mmap(8 * P, Prot::RW, MapKind::AnonPrivate).unwrap();
        mm.write(a, &[1; 8 * P as usize]).unwrap();
        let kvm = ShadowMmu::attach(mm.grab()).unwrap();
        let tlb = SecondaryTlb::bind(mm.grab()).unwrap();
        let dev = mirrors::DeviceMirror::open(mm.grab(), mmu_notifier::Owner(77)).unwrap();
        let cache = MrCache::new(mm.grab(), 8);
        kvm.fault(a, true).unwrap();
        tlb.access(a, None).unwrap();
        dev.read(a, 2).unwrap();
        let reg = cache.get(a + 2 * P, P, true).unwrap();
        let sleepy = bad.then(|| {
            mm.subscriptions()
                .interval_insert(
                    a,
                    8 * P,
                    Arc::new(Sleepy(mmu_notifier::CheckedMutex::new(()))),
                )
                .unwrap()
        });
        let report = mm.oom_reap();
        let sleeps = mm.subscriptions().diagnostics().count(SleepInNonBlockable);
        if bad {
            assert!(sleeps >= 1, "the sleeping mirror is reported ({report:?})");
        } else {
            assert_eq!(
                sleeps, 0,
                "the reference mirrors never sleep there ({report:?})"
            );
        }
        drop((reg, sleepy));
        assert_eq!(phys.oracle().violation_count(), 0);
    }
}
