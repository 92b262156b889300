//! Random operation sequences on softmm checked against a simple model:
//! page contents as the program sees them (parent and a fork child), plus
//! the frame accounting (every mapping counted once, nothing leaked, no
//! double free). Run longer with `PROPTEST_CASES=5000`.

mod common;

use std::collections::BTreeMap;

use common::{check_accounting, P};
use mmu_notifier::Owner;
use proptest::prelude::*;
use softmm::{Error, MapKind, Mm, PhysMem, PinnedPages, Prot};

#[derive(Clone, Debug)]
enum Action {
    Mmap(u8),
    Munmap(usize, u8),
    Write(bool, usize, u8),
    Read(bool, usize),
    Protect(usize, bool),
    DontNeed(usize),
    Free(usize),
    SwapOut(usize),
    Migrate(usize),
    Ksm,
    Fork,
    ExitChild,
    ToDevice(usize),
    ToRam(usize),
    Exclusive(usize),
    SoftDirty,
    Age,
    Mremap(usize),
    Pin(usize, bool),
    Unpin,
    /// A 2 MiB block under MADV_HUGEPAGE (its first fault maps a THP).
    MmapHuge,
    /// khugepaged's collapse of the block of a page.
    Collapse(usize),
    /// MADV_NOHUGEPAGE on one page (splits the VMA, and a THP there).
    NoHuge(usize),
    /// A private hugetlb mapping of one 2 MiB page.
    MmapHugetlb,
}

fn action() -> impl Strategy<Value = Action> {
    let k = 0usize..64;
    prop_oneof![
        2 => (1u8..5).prop_map(Action::Mmap),
        1 => (k.clone(), 1u8..3).prop_map(|(k, n)| Action::Munmap(k, n)),
        6 => (any::<bool>(), k.clone(), any::<u8>()).prop_map(|(c, k, v)| Action::Write(c, k, v)),
        4 => (any::<bool>(), k.clone()).prop_map(|(c, k)| Action::Read(c, k)),
        1 => (k.clone(), any::<bool>()).prop_map(|(k, ro)| Action::Protect(k, ro)),
        1 => k.clone().prop_map(Action::DontNeed),
        1 => k.clone().prop_map(Action::Free),
        1 => k.clone().prop_map(Action::SwapOut),
        1 => k.clone().prop_map(Action::Migrate),
        1 => Just(Action::Ksm),
        1 => Just(Action::Fork),
        1 => Just(Action::ExitChild),
        1 => k.clone().prop_map(Action::ToDevice),
        1 => k.clone().prop_map(Action::ToRam),
        1 => k.clone().prop_map(Action::Exclusive),
        1 => Just(Action::SoftDirty),
        1 => Just(Action::Age),
        1 => k.clone().prop_map(Action::Mremap),
        1 => (k.clone(), any::<bool>()).prop_map(|(k, w)| Action::Pin(k, w)),
        1 => Just(Action::Unpin),
        1 => Just(Action::MmapHuge),
        1 => k.clone().prop_map(Action::Collapse),
        1 => k.clone().prop_map(Action::NoHuge),
        1 => Just(Action::MmapHugetlb),
    ]
}

/// What a page should read as: one value, or (after MADV_FREE) either the
/// old value or zero, until observed or written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Val {
    Is(u8),
    OldOrZero(u8),
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// Mapped page → (value, read-only).
    pages: BTreeMap<u64, (Val, bool)>,
    /// Start addresses of the hugetlb pages mapped (2 MiB each).
    hugetlb: std::collections::BTreeSet<u64>,
}

impl Model {
    fn key(&self, k: usize) -> Option<u64> {
        if self.pages.is_empty() {
            return None;
        }
        self.pages.keys().nth(k % self.pages.len()).copied()
    }

    fn in_hugetlb(&self, a: u64) -> bool {
        self.hugetlb.contains(&(a & !(softmm::PMD_SIZE - 1)))
    }
}

const DEV: Owner = Owner(1);

fn run(actions: Vec<Action>) {
    // Room for a few transparent huge pages next to the base pages.
    let phys = PhysMem::new(8 * softmm::HPAGE_PMD_NR as usize);
    let parent = Mm::new(&phys);
    let mut models = vec![Model::default()];
    let mut child: Option<Mm> = None;
    let mut pins: Vec<PinnedPages> = Vec::new();
    for act in actions {
        let on_child =
            matches!(act, Action::Write(true, ..) | Action::Read(true, _)) && child.is_some();
        let (mm, idx) = match (&child, on_child) {
            (Some(c), true) => (c, 1),
            _ => (&parent, 0),
        };
        let model = &mut models[idx];
        match act {
            // A 4 KiB operation on hugetlb memory: refused (it would split
            // a huge page) or a no-op, and nothing changes.
            Action::Munmap(k, _)
            | Action::Protect(k, _)
            | Action::DontNeed(k)
            | Action::Free(k)
            | Action::ToDevice(k)
            | Action::Exclusive(k)
            | Action::Mremap(k)
            | Action::NoHuge(k)
                if model.key(k).is_some_and(|a| model.in_hugetlb(a)) =>
            {
                let a = model.key(k).unwrap();
                let aligned = a % softmm::PMD_SIZE == 0;
                match act {
                    Action::Munmap(_, n) => assert!(mm.munmap(a, u64::from(n) * P).is_err()),
                    Action::Protect(..) => assert!(mm.mprotect(a, P, Prot::READ).is_err()),
                    // The end rounds down to the start: nothing to do.
                    Action::DontNeed(_) => assert_eq!(mm.madvise_dontneed(a, P).is_ok(), aligned),
                    Action::Free(_) => assert!(mm.madvise_free(a, P).is_err()),
                    Action::ToDevice(_) => assert!(mm.migrate_to_device(a, P, DEV).is_err()),
                    Action::Exclusive(_) => {
                        assert_eq!(
                            mm.make_device_exclusive(a, P, Some(DEV)).unwrap(),
                            vec![None]
                        );
                    }
                    // Rounded to one huge page each: no growth, no move.
                    Action::Mremap(_) => match mm.mremap(a, P, 2 * P, true) {
                        Ok(b) => assert!(aligned && b == a),
                        Err(_) => assert!(!aligned),
                    },
                    _ => assert!(mm.madvise_nohugepage(a, P).is_err()),
                }
            }
            Action::Mmap(n) => {
                let a = mm
                    .mmap(u64::from(n) * P, Prot::RW, MapKind::AnonPrivate)
                    .unwrap();
                for i in 0..u64::from(n) {
                    model.pages.insert(a + i * P, (Val::Is(0), false));
                }
            }
            Action::Munmap(k, n) => {
                if let Some(a) = model.key(k) {
                    mm.munmap(a, u64::from(n) * P).unwrap();
                    for i in 0..u64::from(n) {
                        model.pages.remove(&(a + i * P));
                    }
                }
            }
            Action::Write(_, k, v) => {
                if let Some(a) = model.key(k) {
                    let ro = model.pages[&a].1;
                    let r = mm.write(a + 5, &[v]);
                    if ro {
                        assert!(matches!(r, Err(Error::Protection { .. })), "{r:?}");
                    } else if model.in_hugetlb(a) && matches!(r, Err(Error::OutOfMemory)) {
                        // No huge page free for the fault or the COW copy
                        // (Linux: SIGBUS): the page is unchanged.
                    } else {
                        r.unwrap();
                        model.pages.insert(a, (Val::Is(v), false));
                    }
                }
            }
            Action::Read(_, k) => {
                if let Some(a) = model.key(k) {
                    let mut b = [0u8];
                    let r = mm.read(a + 5, &mut b);
                    if model.in_hugetlb(a) && matches!(r, Err(Error::OutOfMemory)) {
                        continue;
                    }
                    r.unwrap();
                    let (val, ro) = model.pages[&a];
                    match val {
                        Val::Is(v) => assert_eq!(b[0], v, "page {a:#x}"),
                        Val::OldOrZero(v) => assert!(b[0] == v || b[0] == 0, "page {a:#x}"),
                    }
                    // Reading does not cancel MADV_FREE: a page read as
                    // its old value may still be discarded later.
                    if b[0] == 0 || matches!(val, Val::Is(_)) {
                        model.pages.insert(a, (Val::Is(b[0]), ro));
                    }
                }
            }
            Action::Protect(k, ro) => {
                if let Some(a) = model.key(k) {
                    mm.mprotect(a, P, if ro { Prot::READ } else { Prot::RW })
                        .unwrap();
                    model.pages.get_mut(&a).unwrap().1 = ro;
                }
            }
            Action::DontNeed(k) => {
                if let Some(a) = model.key(k) {
                    mm.madvise_dontneed(a, P).unwrap();
                    model.pages.get_mut(&a).unwrap().0 = Val::Is(0);
                }
            }
            Action::Free(k) => {
                if let Some(a) = model.key(k) {
                    mm.madvise_free(a, P).unwrap();
                    let e = model.pages.get_mut(&a).unwrap();
                    if let Val::Is(v) = e.0 {
                        e.0 = Val::OldOrZero(v);
                    }
                }
            }
            Action::SwapOut(k) => {
                if let Some(a) = model.key(k) {
                    mm.swap_out(a, P).unwrap();
                }
            }
            Action::Migrate(k) => {
                if let Some(a) = model.key(k) {
                    mm.migrate_pages(a, P).unwrap();
                }
            }
            Action::Ksm => {
                mm.ksm_merge(softmm::MMAP_BASE, softmm::TASK_SIZE - softmm::MMAP_BASE)
                    .unwrap();
            }
            Action::Fork => {
                if child.is_none() {
                    child = Some(parent.fork().unwrap());
                    let m = models[0].clone();
                    models.truncate(1);
                    models.push(m);
                }
            }
            Action::ExitChild => {
                if let Some(c) = child.take() {
                    assert!(c.exit());
                    models.truncate(1);
                }
            }
            Action::ToDevice(k) => {
                if let Some(a) = model.key(k) {
                    let ro = model.pages[&a].1;
                    mm.migrate_to_device(a, P, DEV).unwrap();
                    let _ = ro;
                }
            }
            Action::ToRam(k) => {
                if let Some(a) = model.key(k) {
                    mm.migrate_to_ram(a, P, DEV).unwrap();
                }
            }
            Action::Exclusive(k) => {
                if let Some(a) = model.key(k) {
                    let ro = model.pages[&a].1;
                    let r = mm.make_device_exclusive(a, P, Some(DEV)).unwrap();
                    assert_eq!(r[0].is_some(), !ro);
                    // Exclusive faulting for write resolved any MADV_FREE
                    // doubt: the page was dirtied... only if it was not RO.
                }
            }
            Action::SoftDirty => mm.clear_soft_dirty(),
            Action::Age => {
                mm.age(softmm::MMAP_BASE, softmm::TASK_SIZE - softmm::MMAP_BASE)
                    .unwrap();
            }
            Action::Mremap(k) => {
                if let Some(a) = model.key(k) {
                    let (val, ro) = model.pages.remove(&a).unwrap();
                    let b = mm.mremap(a, P, 2 * P, true).unwrap();
                    model.pages.insert(b, (val, ro));
                    model.pages.insert(b + P, (Val::Is(0), ro));
                }
            }
            Action::Pin(k, w) => {
                if let Some(a) = model.key(k) {
                    let ro = model.pages[&a].1;
                    let r = mm.pin(a, 1, w);
                    if w && ro {
                        assert!(r.is_err());
                    } else if model.in_hugetlb(a) && matches!(r, Err(Error::OutOfMemory)) {
                    } else {
                        pins.push(r.unwrap());
                    }
                }
            }
            Action::Unpin => {
                if let Some(p) = pins.pop() {
                    p.unpin().unwrap();
                }
            }
            Action::MmapHuge => {
                let len = softmm::PMD_SIZE;
                let a = mm.mmap(2 * len, Prot::RW, MapKind::AnonPrivate).unwrap();
                let b = (a + len - 1) & !(len - 1);
                mm.munmap(a, b - a).ok();
                mm.munmap(b + len, a + 2 * len - (b + len)).ok();
                mm.madvise_hugepage(b, len).unwrap();
                for i in 0..len / P {
                    model.pages.insert(b + i * P, (Val::Is(0), false));
                }
            }
            Action::Collapse(k) => {
                if let Some(a) = model.key(k) {
                    mm.collapse(a).unwrap();
                }
            }
            Action::NoHuge(k) => {
                if let Some(a) = model.key(k) {
                    mm.madvise_nohugepage(a, P).unwrap();
                }
            }
            Action::MmapHugetlb => {
                let len = softmm::PMD_SIZE;
                let a = mm
                    .mmap(len, Prot::RW, MapKind::Hugetlb { shared: false })
                    .unwrap();
                model.hugetlb.insert(a);
                for i in 0..len / P {
                    model.pages.insert(a + i * P, (Val::Is(0), false));
                }
            }
        }
        let mut live = vec![&parent];
        if let Some(c) = &child {
            live.push(c);
        }
        check_accounting(&phys, &live);
    }
    // Everything goes away: no frame, swap slot or reference is left.
    drop(child);
    drop(parent);
    drop(pins);
    let s = phys.stats();
    assert_eq!((s.in_use, s.swap_slots, s.underflows), (1, 0, 0), "{s:?}");
    assert_eq!(phys.oracle().violation_count(), 0);
}

/// Found by the model: a page first populated by a device migration into a
/// hole, then migrated back, must be copied by fork (its VMA has anonymous
/// pages even though no CPU fault ever created one).
#[test]
fn regression_device_filled_hole_is_copied_by_fork() {
    run(vec![
        Action::Mmap(1),
        Action::Mmap(2),
        Action::Mremap(0),
        Action::ToDevice(3),
        Action::Mmap(4),
        Action::Write(false, 3, 1),
        Action::Mremap(40),
        Action::Fork,
        Action::Read(true, 2),
    ]);
}

proptest! {
    // 256 cases in CI; `PROPTEST_CASES` overrides for long runs.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_operations_match_the_model(actions in proptest::collection::vec(action(), 1..80)) {
        run(actions);
    }
}
