//! The set-up shared by `stress`, `run` and `bench`: a machine, address
//! spaces with the standard layout, and the four reference mirrors.

use std::sync::Arc;

use mirrors::{DeviceMirror, MrCache, SecondaryTlb, ShadowMmu};
use mmu_notifier::Owner;
use softmm::{MapKind, Mm, MmGrab, PhysMem, Prot, SharedObject, PAGE_SIZE};

use crate::trace::Monitor;

/// Private anonymous region of every stress address space.
pub const PRIV: u64 = 0x1000_0000;
/// Pages in it.
pub const PRIV_PAGES: u64 = 64;
/// Shared anonymous region.
pub const SHARED: u64 = 0x2000_0000;
/// File-backed shared region.
pub const FILE: u64 = 0x3000_0000;
/// Pages in each shared region.
pub const SHARED_PAGES: u64 = 16;
/// Where mremap moves pages to (and back from).
pub const SCRATCH: u64 = 0x4000_0000;
/// Private anonymous region under `MADV_HUGEPAGE` (2 MiB aligned): its
/// faults map transparent huge pages, which the other operations split.
pub const HUGE: u64 = 0x5000_0000;
/// Pages in it: two 2 MiB blocks.
pub const HUGE_PAGES: u64 = 2 * softmm::HPAGE_PMD_NR;
/// Private hugetlb region (`MAP_HUGETLB`): two 2 MiB pages.
pub const HUGETLB: u64 = 0x6000_0000;
/// Pages in it.
pub const HUGETLB_PAGES: u64 = 2 * softmm::HPAGE_PMD_NR;

/// The four reference secondaries attached to one address space.
pub struct Mirrors {
    /// KVM-style shadow MMU.
    pub kvm: ShadowMmu<MmGrab>,
    /// HMM-style device mirror.
    pub dev: DeviceMirror,
    /// SVA secondary TLB.
    pub tlb: SecondaryTlb<MmGrab>,
    /// RDMA-style registration cache.
    pub cache: MrCache<MmGrab>,
}

impl Mirrors {
    /// Attaches all four to `mm`; `owner` is the device's pgmap owner.
    pub fn attach(mm: &Mm, owner: Owner) -> Result<Mirrors, String> {
        Ok(Mirrors {
            kvm: ShadowMmu::attach(mm.grab()).map_err(|e| e.to_string())?,
            dev: DeviceMirror::open(mm.grab(), owner).map_err(|e| e.to_string())?,
            tlb: SecondaryTlb::bind(mm.grab()).map_err(|e| e.to_string())?,
            cache: MrCache::new(mm.grab(), 32),
        })
    }
}

/// One stress address space.
pub struct Space {
    /// The address space.
    pub mm: Mm,
    /// Its file.
    pub file: Arc<SharedObject>,
    /// Its mirrors (none in the bench baseline).
    pub mirrors: Option<Mirrors>,
    /// Aim every operation at the first this many pages of each region
    /// (`None`: anywhere). Few pages make operations collide more often,
    /// which is what schedule exploration needs.
    pub hot: Option<u64>,
}

/// Creates an address space with the standard layout and, if asked, the
/// four mirrors, plus the monitor.
pub fn space(phys: &Arc<PhysMem>, monitor: &Arc<Monitor>, idx: u64, with_mirrors: bool) -> Space {
    let mm = Mm::new(phys);
    mm.subscriptions()
        .register(monitor.clone())
        .expect("a new address space accepts notifiers");
    let file =
        SharedObject::new_file(phys, SHARED_PAGES, b"mmun file").expect("frames for the file");
    mm.mmap_fixed(PRIV, PRIV_PAGES * PAGE_SIZE, Prot::RW, MapKind::AnonPrivate)
        .expect("fixed layout");
    mm.mmap_fixed(
        SHARED,
        SHARED_PAGES * PAGE_SIZE,
        Prot::RW,
        MapKind::AnonShared,
    )
    .expect("fixed layout");
    mm.mmap_fixed(
        FILE,
        SHARED_PAGES * PAGE_SIZE,
        Prot::RW,
        MapKind::File {
            file: file.clone(),
            pgoff: 0,
        },
    )
    .expect("fixed layout");
    mm.mmap_fixed(HUGE, HUGE_PAGES * PAGE_SIZE, Prot::RW, MapKind::AnonPrivate)
        .expect("fixed layout");
    mm.madvise_hugepage(HUGE, HUGE_PAGES * PAGE_SIZE)
        .expect("fixed layout");
    mm.mmap_fixed(
        HUGETLB,
        HUGETLB_PAGES * PAGE_SIZE,
        Prot::RW,
        MapKind::Hugetlb { shared: false },
    )
    .expect("fixed layout");
    let mirrors =
        with_mirrors.then(|| Mirrors::attach(&mm, Owner(idx + 1)).expect("live address space"));
    Space {
        mm,
        file,
        mirrors,
        hot: None,
    }
}
