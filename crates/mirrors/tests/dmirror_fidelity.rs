//! Where `DeviceMirror` follows Linux's dmirror (`lib/test_hmm.c`) beyond
//! what the selftests look at: the results of the commands at their edges,
//! and the driver registration shared by several opens of one device.

use std::sync::Arc;

use mirrors::{DeviceMirror, DmirrorError};
use mmu_notifier::Owner;
use softmm::{MapKind, Mm, PhysMem, Prot, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn machine() -> (Arc<PhysMem>, Mm) {
    let phys = PhysMem::new(1024);
    let mm = Mm::new(&phys);
    (phys, mm)
}

fn filled(mm: &Mm, npages: u64, prot: Prot) -> u64 {
    let a = mm.mmap(npages * P, Prot::RW, MapKind::AnonPrivate).unwrap();
    for i in 0..npages {
        mm.write(a + i * P, &[i as u8 + 1]).unwrap();
    }
    if prot != Prot::RW {
        mm.mprotect(a, npages * P, prot).unwrap();
    }
    a
}

/// MIGRATE_TO_SYS over a range without a readable VMA is -EINVAL (dmirror
/// checks each chunk's VMA), not a success that moved nothing.
#[test]
fn migrate_to_system_over_prot_none_or_unmapped_memory_is_einval() {
    let (_phys, mm) = machine();
    let d = DeviceMirror::open(mm.grab(), Owner(1)).unwrap();
    let none = filled(&mm, 2, Prot::NONE);
    assert_eq!(d.migrate_to_system(none, 2), Err(DmirrorError::Inval));
    let gone = filled(&mm, 2, Prot::RW);
    mm.munmap(gone, 2 * P).unwrap();
    assert_eq!(d.migrate_to_system(gone, 2), Err(DmirrorError::Inval));
    // Mapped and readable: the device's pages come back, counted.
    let a = filled(&mm, 2, Prot::RW);
    d.migrate_to_device(a, 2).unwrap();
    assert_eq!(d.migrate_to_system(a, 2).unwrap().cpages, 2);
}

/// A forked child writing through its own mirror to device pages it
/// inherited read-only gets -EFAULT: the write fault reports the device's
/// own pages without migrating them back, and they stay read-only.
#[test]
fn a_child_writing_to_inherited_read_only_device_pages_gets_efault() {
    let (_phys, parent) = machine();
    let owner = Owner(2);
    let pd = DeviceMirror::open(parent.grab(), owner).unwrap();
    let a = filled(&parent, 2, Prot::RW);
    pd.migrate_to_device(a, 2).unwrap();
    let child = parent.fork().unwrap();
    let cd = DeviceMirror::open(child.grab(), owner).unwrap();
    assert_eq!(
        cd.write(a, &vec![7u8; (2 * P) as usize]),
        Err(DmirrorError::Fault)
    );
    // Brought back to system memory first, the write succeeds.
    cd.migrate_to_system(a, 2).unwrap();
    cd.write(a, &vec![7u8; (2 * P) as usize]).unwrap();
    let mut b = [0u8; 1];
    child.read(a, &mut b).unwrap();
    assert_eq!(b[0], 7);
    drop((cd, pd));
}

/// Two opens of one device (the same pgmap owner): closing one leaves the
/// other's driver registration in place, so a CPU fault that brings a page
/// of the other back to RAM still drops that mirror's entry.
#[test]
fn closing_one_of_two_opens_of_a_device_keeps_the_others_driver() {
    let (phys, mm) = machine();
    let owner = Owner(3);
    let first = DeviceMirror::open(mm.grab(), owner).unwrap();
    let second = DeviceMirror::open(mm.grab(), owner).unwrap();
    let a = filled(&mm, 1, Prot::RW);
    first.migrate_to_device(a, 1).unwrap();
    let (frame, _) = first.entry(a).expect("mapped by the device");
    drop(second);
    // A CPU access migrates the page back to RAM: the driver is told.
    mm.write(a, &[9]).unwrap();
    assert_eq!(first.entry(a), None, "the first open's entry was dropped");
    assert!(
        phys.oracle()
            .check_access(&mm.grab(), a, frame, false)
            .is_err(),
        "the device frame is no longer the page"
    );
}

/// EXCLUSIVE reads the range back; an entry invalidated before that (the
/// CPU took the page back) makes it -ENOENT, as dmirror_do_read does, never
/// a success with fewer pages.
#[test]
fn exclusive_with_an_entry_lost_before_the_read_back_is_enoent_not_a_short_success() {
    let (_phys, mm) = machine();
    let mm = Arc::new(mm);
    let d = Arc::new(DeviceMirror::open(mm.grab(), Owner(4)).unwrap());
    let a = filled(&mm, 8, Prot::RW);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpu = {
        let (mm, stop) = (mm.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mm.write(a + (i % 8) * P, &[i as u8]).unwrap();
                i += 1;
            }
        })
    };
    let (mut ok, mut noent) = (0, 0);
    for _ in 0..3000 {
        match d.exclusive(a, 8) {
            Ok((_, cmd)) => {
                assert_eq!(cmd.cpages, 8, "a success covers the whole range");
                ok += 1;
            }
            Err(DmirrorError::NoEnt) => noent += 1,
            Err(DmirrorError::Busy) => {}
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    cpu.join().unwrap();
    eprintln!("exclusive under CPU writes: {ok} whole, {noent} ENOENT");
}

/// RELEASE evicts this device's memory from this mirror's address space
/// only (a documented difference from dmirror, which evicts it from every
/// process): after a fork, the parent's RELEASE leaves the child's
/// inherited device pages, which the child's own RELEASE brings back.
#[test]
fn release_evicts_the_mirrors_own_address_space_and_a_child_releases_its_own() {
    let (_phys, parent) = machine();
    let owner = Owner(5);
    let pd = DeviceMirror::open(parent.grab(), owner).unwrap();
    let a = filled(&parent, 4, Prot::RW);
    pd.migrate_to_device(a, 4).unwrap();
    let child = parent.fork().unwrap();
    let cd = DeviceMirror::open(child.grab(), owner).unwrap();
    assert_eq!(pd.release_device_memory().unwrap().cpages, 4);
    let snap = |d: &DeviceMirror| d.snapshot(a, 4).unwrap().0;
    assert!(
        snap(&cd)
            .iter()
            .all(|&b| b & 0x30 == mirrors::device::prot::DEV_PRIVATE_LOCAL),
        "the child's pages are still on the device"
    );
    assert_eq!(cd.release_device_memory().unwrap().cpages, 4);
    assert!(
        snap(&cd).iter().all(|&b| b & 0x30 == 0),
        "now in system memory"
    );
}

/// FLAGS with FAIL_ALLOC fails the mirror's next device-page allocation,
/// once: that page stays in system memory, so the migration's read-back
/// misses it (-ENOENT), and the next migration succeeds. An unknown bit is
/// -EINVAL.
#[test]
fn fail_alloc_fails_one_device_allocation() {
    let (_phys, mm) = machine();
    let d = DeviceMirror::open(mm.grab(), Owner(6)).unwrap();
    let a = filled(&mm, 4, Prot::RW);
    assert_eq!(d.set_flags(1 << 7), Err(DmirrorError::Inval));
    d.set_flags(mirrors::device::flags::FAIL_ALLOC).unwrap();
    assert_eq!(d.migrate_to_device(a, 4), Err(DmirrorError::NoEnt));
    let snap = d.snapshot(a, 4).unwrap().0;
    let local = mirrors::device::prot::DEV_PRIVATE_LOCAL;
    assert_eq!(snap[0] & 0x30, 0, "the first page stayed in system memory");
    assert!(snap[1..].iter().all(|&b| b & 0x30 == local), "{snap:?}");
    // The flag was used up: the page moves now.
    d.migrate_to_device(a, 4).unwrap();
    assert!(d
        .snapshot(a, 4)
        .unwrap()
        .0
        .iter()
        .all(|&b| b & 0x30 == local));
}
