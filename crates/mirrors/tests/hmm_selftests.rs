//! A peer of Linux's `tools/testing/selftests/mm/hmm-tests.c`:
//! the same scenarios with the same expected counts, against
//! `DeviceMirror` on softmm. Device 0 and 1 are DEVICE_PRIVATE; the
//! DEVICE_COHERENT variants (skipped by Linux without module parameters)
//! are not modelled. `anon_write_huge` runs on a real transparent huge
//! page, `anon_write_hugetlbfs` and `compound` on hugetlb memory (2 MiB).

use std::sync::Arc;

use mirrors::device::prot;
use mirrors::{DeviceMirror, DmirrorError};
use mmu_notifier::Owner;
use softmm::{MapKind, Mm, PhysMem, Prot, SharedObject, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
/// HMM_BUFFER_SIZE: 4 MiB.
const NPAGES: u64 = 1024;
const NTIMES: usize = 10;

fn machine() -> (Arc<PhysMem>, Mm) {
    let phys = PhysMem::new(8192);
    let mm = Mm::new(&phys);
    (phys, mm)
}

fn dev(mm: &Mm, n: u64) -> DeviceMirror {
    DeviceMirror::open(mm.grab(), Owner(n)).unwrap()
}

/// `ptr[i] = i` as 32-bit words, the selftests' fill pattern.
fn pattern(npages: u64, base: u32) -> Vec<u8> {
    (0..(npages * P / 4) as u32)
        .flat_map(|i| (i.wrapping_add(base)).to_le_bytes())
        .collect()
}

fn cpu_read(mm: &Mm, a: u64, npages: u64) -> Vec<u8> {
    let mut v = vec![0u8; (npages * P) as usize];
    mm.read(a, &mut v).unwrap();
    v
}

fn anon(mm: &Mm, npages: u64, prot: Prot) -> u64 {
    mm.mmap(npages * P, prot, MapKind::AnonPrivate).unwrap()
}

/// An address space with device 0 open and `npages` private pages filled
/// with the selftests' pattern.
struct Filled {
    _phys: Arc<PhysMem>,
    mm: Mm,
    d: DeviceMirror,
    a: u64,
    data: Vec<u8>,
}

fn filled(npages: u64) -> Filled {
    let (phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = anon(&mm, npages, Prot::RW);
    let data = pattern(npages, 0);
    mm.write(a, &data).unwrap();
    Filled {
        _phys: phys,
        mm,
        d,
        a,
        data,
    }
}

#[test]
fn open_close() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    assert_eq!(mm.subscriptions().interval_count(), 1);
    drop(d);
    assert_eq!(mm.subscriptions().interval_count(), 0);
}

#[test]
fn anon_read() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = anon(&mm, NPAGES, Prot::RW);
    let mut data = pattern(NPAGES, 0);
    data[..2 * P as usize].fill(0); // page 0 pte_none, page 1 the zero page
    mm.write(a + 2 * P, &data[2 * P as usize..]).unwrap();
    let _ = cpu_read(&mm, a + P, 1);
    mm.mprotect(a, NPAGES * P, Prot::READ).unwrap();
    let (mirror, cmd) = d.read(a, NPAGES).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (NPAGES, 1));
    assert_eq!(mirror, data);
}

#[test]
fn anon_read_prot() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = anon(&mm, NPAGES, Prot::RW);
    mm.write(a, &pattern(NPAGES, 0)).unwrap();
    mm.mprotect(a, NPAGES * P, Prot::NONE).unwrap();
    assert_eq!(d.read(a, NPAGES).unwrap_err(), DmirrorError::Fault);
}

#[test]
fn anon_write() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = anon(&mm, NPAGES, Prot::RW);
    device_write_faults_once(&mm, &d, a, NPAGES);
}

/// A device WRITE of the selftests' pattern over `npages` from `a`: every
/// page written with one fault, and the CPU reads the pattern back.
fn device_write_faults_once(mm: &Mm, d: &DeviceMirror, a: u64, npages: u64) {
    let data = pattern(npages, 0);
    let cmd = d.write(a, &data).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (npages, 1));
    assert_eq!(cpu_read(mm, a, npages), data);
}

#[test]
fn anon_write_prot() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = anon(&mm, NPAGES, Prot::READ);
    let (_, cmd) = d.read(a, 1).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (1, 1));
    let data = pattern(NPAGES, 0);
    assert_eq!(d.write(a, &data).unwrap_err(), DmirrorError::Perm);
    assert!(cpu_read(&mm, a, NPAGES).iter().all(|&b| b == 0));
    mm.mprotect(a, NPAGES * P, Prot::RW).unwrap();
    let cmd = d.write(a, &data).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (NPAGES, 1));
    assert_eq!(cpu_read(&mm, a, NPAGES), data);
}

fn write_child(kind: MapKind, shared: bool) {
    let (_phys, mm) = machine();
    let a = mm.mmap(NPAGES * P, Prot::RW, kind).unwrap();
    let orig = pattern(NPAGES, 0);
    mm.write(a, &orig).unwrap();
    let child = mm.fork().unwrap();
    let d = dev(&child, 0); // the child opens its own device file
    let new = pattern(NPAGES, 7);
    let cmd = d.write(a, &new).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (NPAGES, 1));
    assert_eq!(cpu_read(&child, a, NPAGES), new);
    assert_eq!(cpu_read(&mm, a, NPAGES), if shared { new } else { orig });
}

#[test]
fn anon_write_child() {
    write_child(MapKind::AnonPrivate, false);
}

#[test]
fn anon_write_child_shared() {
    write_child(MapKind::AnonShared, true);
}

#[test]
fn anon_write_huge() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let huge = softmm::PMD_SIZE;
    let a = mm
        .mmap_fixed(64 * huge, huge, Prot::RW, MapKind::AnonPrivate)
        .unwrap();
    mm.madvise_hugepage(a, huge).unwrap();
    device_write_faults_once(&mm, &d, a, huge / P);
    // The device's fault made a THP, and SNAPSHOT reports it PMD-mapped.
    assert!(mm.is_pmd_mapped(a));
    let (snap, _) = d.snapshot(a, 512).unwrap();
    assert!(
        snap.iter().all(|&b| b == prot::WRITE | prot::PMD),
        "{:?}",
        &snap[..4]
    );
}

/// The selftests' hugetlbfs buffer: one 2 MiB huge page, private.
fn hugetlb_buffer(mm: &Mm) -> (u64, u64) {
    let size = softmm::PMD_SIZE;
    let a = mm
        .mmap(size, Prot::RW, MapKind::Hugetlb { shared: false })
        .unwrap();
    (a, size / P)
}

#[test]
fn anon_write_hugetlbfs() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let (a, npages) = hugetlb_buffer(&mm);
    device_write_faults_once(&mm, &d, a, npages);
}

#[test]
fn compound() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let (a, npages) = hugetlb_buffer(&mm);
    mm.write(a, &pattern(npages, 0)).unwrap();
    let (snap, cmd) = d.snapshot(a, npages).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert!(snap.iter().all(|&m| m == prot::WRITE | prot::PMD));
    mm.mprotect(a, npages * P, Prot::READ).unwrap();
    let (snap, cmd) = d.snapshot(a, npages).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert!(snap.iter().all(|&m| m == prot::READ | prot::PMD));
}

#[test]
fn file_read() {
    let (phys, mm) = machine();
    let d = dev(&mm, 0);
    let data = pattern(NPAGES, 3);
    let file = SharedObject::new_file(&phys, NPAGES, &data).unwrap();
    let a = mm
        .mmap(NPAGES * P, Prot::READ, MapKind::File { file, pgoff: 0 })
        .unwrap();
    let (mirror, cmd) = d.read(a, NPAGES).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (NPAGES, 1));
    assert_eq!(mirror, data);
}

#[test]
fn file_write() {
    let (phys, mm) = machine();
    let d = dev(&mm, 0);
    let file = SharedObject::new_file(&phys, NPAGES, &[]).unwrap();
    let a = mm
        .mmap(
            NPAGES * P,
            Prot::RW,
            MapKind::File {
                file: file.clone(),
                pgoff: 0,
            },
        )
        .unwrap();
    let data = pattern(NPAGES, 9);
    let cmd = d.write(a, &data).unwrap();
    assert_eq!((cmd.cpages, cmd.faults), (NPAGES, 1));
    assert_eq!(cpu_read(&mm, a, NPAGES), data);
    let mut pread = vec![0u8; data.len()];
    file.pread(0, &mut pread).unwrap();
    assert_eq!(pread, data);
}

#[test]
fn migrate() {
    let Filled {
        mm: _mm,
        d,
        a,
        data,
        ..
    } = filled(NPAGES);
    let (mirror, cmd) = d.migrate_to_device(a, NPAGES).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(mirror, data);
}

#[test]
fn migrate_fault() {
    let Filled { mm, d, a, data, .. } = filled(NPAGES);
    let (_, cmd) = d.migrate_to_device(a, NPAGES).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    // The CPU reads half: those pages fault back to system memory.
    let half = NPAGES / 2;
    assert_eq!(cpu_read(&mm, a, half), data[..(half * P) as usize]);
    let (mirror, cmd) = d.migrate_to_device(a, NPAGES).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(mirror, data);
}

#[test]
fn migrate_release() {
    let Filled { mm, d, a, data, .. } = filled(NPAGES);
    d.migrate_to_device(a, NPAGES).unwrap();
    d.release_device_memory().unwrap();
    let half = NPAGES / 2;
    assert_eq!(cpu_read(&mm, a, half), data[..(half * P) as usize]);
    assert_eq!(d.entries(), 0);
}

#[test]
fn migrate_shared() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = mm.mmap(NPAGES * P, Prot::RW, MapKind::AnonShared).unwrap();
    assert_eq!(
        d.migrate_to_device(a, NPAGES).unwrap_err(),
        DmirrorError::NoEnt
    );
}

#[test]
fn migrate_mixed() {
    let (_phys, mm) = machine();
    let d0 = dev(&mm, 0);
    let d1 = dev(&mm, 1);
    let a = anon(&mm, 6, Prot::NONE);
    // PROT_NONE: -EINVAL.
    assert_eq!(d1.migrate_to_device(a, 6).unwrap_err(), DmirrorError::Inval);
    // A hole at page 1: migrating 3 pages from page 0 is -EINVAL.
    mm.munmap(a + P, P).unwrap();
    assert_eq!(d1.migrate_to_device(a, 3).unwrap_err(), DmirrorError::Inval);
    // Page 2: zero page (RO); page 3: RO with data; pages 4-5: RW with data.
    mm.mprotect(a + 2 * P, 4 * P, Prot::READ).unwrap();
    let _ = cpu_read(&mm, a + 2 * P, 1);
    mm.mprotect(a + 3 * P, 3 * P, Prot::RW).unwrap();
    mm.write(a + 3 * P, &pattern(3, 0)).unwrap();
    mm.mprotect(a + 3 * P, P, Prot::READ).unwrap();
    let (_, cmd) = d1.migrate_to_device(a + 2 * P, 4).unwrap();
    assert_eq!(cmd.cpages, 4);
    // Page 5 is now device-private on device 1: device 0 cannot take it.
    assert_eq!(
        d0.migrate_to_device(a + 5 * P, 1).unwrap_err(),
        DmirrorError::NoEnt
    );
}

#[test]
fn migrate_multiple() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    for round in 0..NTIMES {
        let a = anon(&mm, NPAGES, Prot::RW);
        let data = pattern(NPAGES, round as u32);
        mm.write(a, &data).unwrap();
        let (mirror, cmd) = d.migrate_to_device(a, NPAGES).unwrap();
        assert_eq!(cmd.cpages, NPAGES);
        assert_eq!(mirror, data);
        assert_eq!(cpu_read(&mm, a, NPAGES), data);
        mm.munmap(a, NPAGES * P).unwrap();
    }
}

#[test]
fn anon_read_multiple() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    for round in 0..NTIMES {
        let a = anon(&mm, NPAGES, Prot::RW);
        let data = pattern(NPAGES, round as u32);
        mm.write(a, &data).unwrap();
        let (mirror, cmd) = d.read(a, NPAGES).unwrap();
        assert_eq!((cmd.cpages, cmd.faults), (NPAGES, 1));
        assert_eq!(mirror, data);
        mm.munmap(a, NPAGES * P).unwrap();
    }
}

#[test]
fn anon_teardown() {
    let (phys, mm) = machine();
    let d = Arc::new(dev(&mm, 0));
    for round in 0..NTIMES {
        let a = anon(&mm, NPAGES, Prot::RW);
        let data = pattern(NPAGES, round as u32);
        mm.write(a, &data).unwrap();
        let mm2 = mm.clone();
        let delay = (round as u64 * 7919) % 32;
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_micros(delay));
            mm2.munmap(a + NPAGES / 2 * P, NPAGES / 2 * P).unwrap();
        });
        if let Ok((mirror, cmd)) = d.read(a, NPAGES) {
            assert_eq!(cmd.cpages, NPAGES);
            assert_eq!(cmd.faults, 1);
            assert_eq!(mirror, data);
        }
        t.join().unwrap();
        mm.munmap(a, NPAGES * P).unwrap();
    }
    assert_eq!(phys.oracle().violation_count(), 0);
}

#[test]
fn mixedmap() {
    let (phys, mm) = machine();
    let d = dev(&mm, 0);
    // The device file's mmap: pages inserted at mmap time, read-only here.
    let file = SharedObject::new_file(&phys, 1, &[0]).unwrap();
    let a = mm
        .mmap(P, Prot::READ, MapKind::File { file, pgoff: 0 })
        .unwrap();
    let _ = cpu_read(&mm, a, 1);
    let (snap, cmd) = d.snapshot(a, 1).unwrap();
    assert_eq!(cmd.cpages, 1);
    assert_eq!(snap, vec![prot::READ]);
}

#[test]
fn snapshot() {
    let (_phys, mm) = machine();
    let d0 = dev(&mm, 0);
    let d1 = dev(&mm, 1);
    let a = anon(&mm, 7, Prot::RW);
    mm.munmap(a + P, P).unwrap(); // page 1: hole
    let _ = cpu_read(&mm, a + 2 * P, 1); // page 2: zero page
    mm.write(a + 3 * P, &[1]).unwrap();
    mm.mprotect(a + 3 * P, P, Prot::READ).unwrap(); // page 3: RO data
    mm.write(a + 4 * P, &[1]).unwrap(); // page 4: RW data
    mm.write(a + 5 * P, &[1]).unwrap();
    d0.migrate_to_device(a + 5 * P, 1).unwrap(); // page 5: on dev0
    mm.write(a + 6 * P, &[1]).unwrap();
    d1.migrate_to_device(a + 6 * P, 1).unwrap(); // page 6: on dev1
    mm.mprotect(a, P, Prot::NONE).unwrap(); // page 0: PROT_NONE
    let (snap, cmd) = d0.snapshot(a, 7).unwrap();
    assert_eq!(cmd.cpages, 7);
    assert_eq!(
        snap,
        vec![
            prot::ERROR,
            prot::ERROR,
            prot::ZERO | prot::READ,
            prot::READ,
            prot::WRITE,
            prot::DEV_PRIVATE_LOCAL | prot::WRITE,
            prot::NONE,
        ]
    );
}

#[test]
fn double_map() {
    let (_phys, mm) = machine();
    let d0 = dev(&mm, 0);
    let d1 = dev(&mm, 1);
    let a = anon(&mm, 6, Prot::RW);
    let data = pattern(6, 0);
    mm.write(a, &data).unwrap();
    mm.mprotect(a, 6 * P, Prot::READ).unwrap();
    let (m0, c0) = d0.read(a, 6).unwrap();
    assert_eq!((c0.faults, &m0), (1, &data));
    let (m1, c1) = d1.read(a, 6).unwrap();
    assert_eq!((c1.faults, &m1), (1, &data));
    // Migrate to device 1; device 0 reads again: its pages fault back to RAM.
    let (_, cmd) = d1.migrate_to_device(a, 6).unwrap();
    assert_eq!(cmd.cpages, 6);
    let (m0, c0) = d0.read(a, 6).unwrap();
    assert_eq!((c0.faults, &m0), (1, &data));
}

#[test]
fn exclusive() {
    let Filled { mm, d, a, data, .. } = filled(NPAGES);
    let (mirror, cmd) = d.exclusive(a, NPAGES).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(mirror, data);
    // The CPU increments every word: exclusivity is revoked (EXCLUSIVE, no owner).
    let mut words = cpu_read(&mm, a, NPAGES);
    for w in words.chunks_mut(4) {
        let v = u32::from_le_bytes(w.try_into().unwrap()) + 1;
        w.copy_from_slice(&v.to_le_bytes());
    }
    mm.write(a, &words).unwrap();
    assert_eq!(cpu_read(&mm, a, NPAGES), pattern(NPAGES, 1));
    d.check_exclusive(a, NPAGES).unwrap();
}

#[test]
fn exclusive_mprotect() {
    let Filled { mm, d, a, data, .. } = filled(NPAGES);
    let (_, cmd) = d.exclusive(a, NPAGES).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    mm.mprotect(a, NPAGES * P, Prot::READ).unwrap();
    assert_eq!(d.write(a, &data).unwrap_err(), DmirrorError::Perm);
}

#[test]
fn exclusive_cow() {
    let Filled { mm, d, a, .. } = filled(NPAGES);
    d.exclusive(a, NPAGES).unwrap();
    let child = mm.fork().unwrap();
    for (m, inc) in [(&mm, 1u32), (&child, 2)] {
        let mut words = cpu_read(m, a, NPAGES);
        for w in words.chunks_mut(4) {
            let v = u32::from_le_bytes(w.try_into().unwrap()) + inc;
            w.copy_from_slice(&v.to_le_bytes());
        }
        m.write(a, &words).unwrap();
    }
    assert_eq!(cpu_read(&mm, a, NPAGES), pattern(NPAGES, 1));
    assert_eq!(cpu_read(&child, a, NPAGES), pattern(NPAGES, 2));
}

#[test]
fn hmm_gup_test() {
    let Filled { mm, d, a, data, .. } = filled(4);
    let (_, cmd) = d.migrate_to_device(a, 4).unwrap();
    assert_eq!(cmd.cpages, 4);
    // GUP on each page (basic, fast, pin-fast longterm, pin longterm): private
    // device pages cannot be pinned and migrate back to system memory.
    for i in 0..4 {
        let pin = mm.pin(a + i * P, 1, i >= 2).unwrap();
        drop(pin);
    }
    let (snap, _) = d.snapshot(a, 4).unwrap();
    assert!(snap.iter().all(|&b| b == prot::WRITE), "{snap:x?}");
    assert_eq!(cpu_read(&mm, a, 4), data);
}

#[test]
fn hmm_cow_in_device() {
    let (_phys, mm) = machine();
    let d = dev(&mm, 0);
    let a = anon(&mm, 4, Prot::RW);
    mm.write(a, &pattern(4, 0)).unwrap();
    let (_, cmd) = d.migrate_to_device(a, 4).unwrap();
    assert_eq!(cmd.cpages, 4);
    let child = mm.fork().unwrap();
    mm.write(a, &pattern(4, 5)).unwrap(); // COW; device pages migrate back first
    drop(child);
    let (snap, _) = d.snapshot(a, 4).unwrap();
    assert!(snap.iter().all(|&b| b == prot::WRITE), "{snap:x?}");
}
