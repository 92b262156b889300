//! Page-table entries of the software MMU.

use mmu_notifier::Owner;

use crate::pfn::ZERO_PFN;

/// What a page-table entry points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PteKind {
    /// A present mapping of a frame (the zero page is frame [`ZERO_PFN`]).
    Present {
        /// Frame mapped.
        pfn: u64,
    },
    /// A device-private entry (Linux swap-type entry): the data lives in a
    /// device frame; a CPU access migrates it back to system memory.
    DevicePrivate {
        /// The device frame.
        pfn: u64,
        /// Its pgmap owner.
        owner: Owner,
    },
    /// A device-exclusive entry: the device holds the page for atomics; a
    /// CPU access revokes it first.
    DeviceExclusive {
        /// The (system) frame.
        pfn: u64,
        /// Owner given when the entry was made.
        owner: Option<Owner>,
    },
    /// A migration entry: the page is being migrated; accesses wait.
    Migration {
        /// The source frame.
        pfn: u64,
    },
    /// Swapped out to a swap slot.
    Swap {
        /// Swap slot number.
        slot: u64,
    },
}

/// One page-table entry (Linux `pte_t`): what it maps plus its bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pte {
    /// What the entry points at.
    pub kind: PteKind,
    /// Reads allowed (false for PROT_NONE: present but inaccessible).
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Accessed bit.
    pub young: bool,
    /// Dirty bit.
    pub dirty: bool,
    /// Soft-dirty bit (written since the last soft-dirty clear).
    pub soft_dirty: bool,
}

impl Pte {
    /// A present entry for `pfn`.
    pub fn present(pfn: u64, read: bool, write: bool) -> Pte {
        Pte {
            kind: PteKind::Present { pfn },
            read,
            write,
            young: true,
            dirty: write,
            soft_dirty: true,
        }
    }

    /// The frame the entry refers to, if any (swap entries have none).
    pub fn pfn(&self) -> Option<u64> {
        match self.kind {
            PteKind::Present { pfn }
            | PteKind::DevicePrivate { pfn, .. }
            | PteKind::DeviceExclusive { pfn, .. }
            | PteKind::Migration { pfn } => Some(pfn),
            PteKind::Swap { .. } => None,
        }
    }

    /// A present entry of a frame (not the zero page, not a special entry).
    pub fn present_pfn(&self) -> Option<u64> {
        match self.kind {
            PteKind::Present { pfn } => Some(pfn),
            _ => None,
        }
    }

    /// Whether this maps the shared zero page.
    pub fn is_zero(&self) -> bool {
        self.kind == PteKind::Present { pfn: ZERO_PFN }
    }

    /// What a TLB holding this entry may do: the frame and whether reads
    /// and writes are allowed (device entries are the device's to read;
    /// migration entries are read-only; swap entries grant nothing). The
    /// oracle and the unflushed-entry tracking both use this.
    pub fn access(&self) -> (Option<u64>, bool, bool) {
        match self.kind {
            PteKind::Present { pfn } => (Some(pfn), self.read, self.read && self.write),
            PteKind::DevicePrivate { pfn, .. } | PteKind::DeviceExclusive { pfn, .. } => {
                (Some(pfn), true, self.write)
            }
            PteKind::Migration { pfn } => (Some(pfn), true, false),
            PteKind::Swap { .. } => (None, false, false),
        }
    }

    /// Whether the frame it refers to holds a reference counted in the
    /// frame's mapcount (everything but swap entries and the zero page).
    pub(crate) fn maps_frame(&self) -> Option<u64> {
        self.pfn().filter(|&p| p != ZERO_PFN)
    }
}

/// Bytes mapped by one PMD entry (a page table of 512 PTEs).
pub const PMD_SIZE: u64 = 1 << 21;
/// Bytes mapped by one PUD entry.
pub const PUD_SIZE: u64 = 1 << 30;

/// PTEs one PMD entry maps (a page table's worth: 2 MiB of 4 KiB pages).
pub(crate) const PMD_PAGES: u64 = crate::pfn::HPAGE_PMD_NR;

/// The PTE a PMD entry `head` (which maps the compound page starting at its
/// frame) gives page `off` of its block: the same bits, frame `head + off`.
fn pmd_subpage(head: &Pte, off: u64) -> Pte {
    let PteKind::Present { pfn } = head.kind else {
        unreachable!("a PMD entry maps a present compound page")
    };
    Pte {
        kind: PteKind::Present { pfn: pfn + off },
        ..*head
    }
}

/// The page-table memory of one address space: the PTEs, the PMD entries
/// that map a whole 2 MiB block (a transparent huge page), plus the entries
/// a TLB may still hold because they were downgraded or removed since the
/// last flush of their address (what a secondary TLB may legitimately still
/// use until `arch_invalidate_secondary_tlbs` covers it).
///
/// A block is mapped either by one PMD entry or by PTEs, never both. Reads
/// of a page inside a PMD mapping see the PTE it implies (same bits, frame
/// `head + offset`), so walkers, the oracle and `range_fault` need not know
/// the difference; a write there may change only the bits (which are the
/// PMD's, so all 512 pages change at once): changing what it maps takes a
/// split first (`split_pmd`), as in Linux.
#[derive(Default, Debug)]
pub(crate) struct PageTable {
    ptes: std::collections::BTreeMap<u64, Pte>,
    /// PMD entries by block number (vpn / 512); the entry's frame is the
    /// compound page's head.
    pmds: std::collections::BTreeMap<u64, Pte>,
    /// Downgraded entries not yet flushed, with the change number at which
    /// each was recorded (a TLB may hold any of them).
    unflushed: std::collections::BTreeMap<u64, Vec<(Pte, u64)>>,
    /// The same for PMD entries, by block.
    unflushed_pmds: std::collections::BTreeMap<u64, Vec<(Pte, u64)>>,
    changes: u64,
}

/// Whether replacing `old` by `new` takes away a translation or a
/// permission (and so needs a TLB flush before the old one is gone).
fn downgrades(old: &Pte, new: Option<&Pte>) -> bool {
    let (pfn, read, write) = old.access();
    match new.map(Pte::access) {
        None => pfn.is_some(),
        Some((npfn, nread, nwrite)) => {
            pfn.is_some() && (npfn != pfn || (read && !nread) || (write && !nwrite))
        }
    }
}

impl PageTable {
    pub(crate) fn get(&self, vpn: u64) -> Option<Pte> {
        match self.pmds.get(&(vpn / PMD_PAGES)) {
            Some(head) => Some(pmd_subpage(head, vpn % PMD_PAGES)),
            None => self.ptes.get(&vpn).copied(),
        }
    }

    /// Writes the entry of `vpn`. Inside a PMD mapping only the bits may
    /// change (they are the PMD's); anything else is a missing split.
    pub(crate) fn set(&mut self, vpn: u64, pte: Pte) -> Option<Pte> {
        let block = vpn / PMD_PAGES;
        if let Some(head) = self.pmds.get(&block).copied() {
            let old = pmd_subpage(&head, vpn % PMD_PAGES);
            assert_eq!(
                old.kind, pte.kind,
                "softmm bug: the PTE of vpn {vpn:#x} changes inside a PMD mapping without a split"
            );
            let new_head = Pte {
                kind: head.kind,
                ..pte
            };
            self.pmds.insert(block, new_head);
            if downgrades(&old, Some(&pte)) {
                self.record_pmd(block, head);
            }
            return Some(old);
        }
        let old = self.ptes.insert(vpn, pte);
        if let Some(o) = old.filter(|o| downgrades(o, Some(&pte))) {
            self.record(vpn, o);
        }
        old
    }

    pub(crate) fn remove(&mut self, vpn: u64) -> Option<Pte> {
        assert!(
            !self.pmds.contains_key(&(vpn / PMD_PAGES)),
            "softmm bug: a PTE of vpn {vpn:#x} is cleared inside a PMD mapping without a split"
        );
        let old = self.ptes.remove(&vpn);
        if let Some(o) = old {
            self.record(vpn, o);
        }
        old
    }

    /// The entries of `[first, end)` (pages of PMD mappings included), in
    /// address order.
    pub(crate) fn range(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, Pte)> {
        let mut out: Vec<(u64, Pte)> = self.ptes.range(first..end).map(|(&v, &p)| (v, p)).collect();
        let mut huge = false;
        for (&block, head) in self.pmds.range(first / PMD_PAGES..end.div_ceil(PMD_PAGES)) {
            let lo = (block * PMD_PAGES).max(first);
            let hi = ((block + 1) * PMD_PAGES).min(end);
            out.extend((lo..hi).map(|v| (v, pmd_subpage(head, v % PMD_PAGES))));
            huge = true;
        }
        if huge {
            out.sort_unstable_by_key(|&(v, _)| v);
        }
        out.into_iter()
    }

    /// The PMD entry of `block`, if one maps it.
    pub(crate) fn pmd(&self, block: u64) -> Option<Pte> {
        self.pmds.get(&block).copied()
    }

    /// The blocks mapped by PMD entries that overlap pages `[first, end)`.
    pub(crate) fn pmd_blocks(&self, first: u64, end: u64) -> Vec<u64> {
        self.pmds
            .range(first / PMD_PAGES..end.div_ceil(PMD_PAGES))
            .map(|(&b, _)| b)
            .collect()
    }

    /// Maps `block` with the PMD entry `head` (no PTE may be in it).
    pub(crate) fn set_pmd(&mut self, block: u64, head: Pte) -> Option<Pte> {
        assert!(
            self.ptes
                .range(block * PMD_PAGES..(block + 1) * PMD_PAGES)
                .next()
                .is_none(),
            "softmm bug: a PMD entry over PTEs in block {block:#x}"
        );
        let old = self.pmds.insert(block, head);
        if let Some(o) = old.filter(|o| downgrades(o, Some(&head))) {
            self.record_pmd(block, o);
        }
        old
    }

    /// Clears the PMD entry of `block`; returns it.
    pub(crate) fn clear_pmd(&mut self, block: u64) -> Option<Pte> {
        let old = self.pmds.remove(&block);
        if let Some(o) = old {
            self.record_pmd(block, o);
        }
        old
    }

    /// Replaces the PMD entry of `block` by the 512 PTEs it implies (the
    /// same translations, so nothing is recorded as downgraded). Returns
    /// whether there was one.
    pub(crate) fn split_pmd(&mut self, block: u64) -> bool {
        let Some(head) = self.pmds.remove(&block) else {
            return false;
        };
        for off in 0..PMD_PAGES {
            self.ptes
                .insert(block * PMD_PAGES + off, pmd_subpage(&head, off));
        }
        true
    }

    fn record(&mut self, vpn: u64, old: Pte) {
        self.changes += 1;
        let n = self.changes;
        self.unflushed.entry(vpn).or_default().push((old, n));
    }

    fn record_pmd(&mut self, block: u64, old: Pte) {
        self.changes += 1;
        let n = self.changes;
        self.unflushed_pmds.entry(block).or_default().push((old, n));
    }

    /// The change number a flush starting now covers: a flush covers only
    /// the changes made before its TLB callbacks ran (a flush may run
    /// without the PTL, concurrently with new downgrades).
    pub(crate) fn flush_mark(&self) -> u64 {
        self.changes
    }

    /// The TLB was flushed for pages `[first, end)`, for the changes up to
    /// `mark`. (A PMD entry is one TLB entry: a flush of any of its pages
    /// drops it, as on x86.)
    pub(crate) fn flushed(&mut self, first: u64, end: u64, mark: u64) {
        fn retain(
            map: &mut std::collections::BTreeMap<u64, Vec<(Pte, u64)>>,
            first: u64,
            end: u64,
            mark: u64,
        ) {
            let keys: Vec<u64> = map.range(first..end).map(|(&k, _)| k).collect();
            for k in keys {
                if let Some(v) = map.get_mut(&k) {
                    v.retain(|&(_, n)| n > mark);
                    if v.is_empty() {
                        map.remove(&k);
                    }
                }
            }
        }
        retain(&mut self.unflushed, first, end, mark);
        retain(
            &mut self.unflushed_pmds,
            first / PMD_PAGES,
            end.div_ceil(PMD_PAGES),
            mark,
        );
    }

    /// The entries a TLB may still hold for `vpn`.
    pub(crate) fn unflushed(&self, vpn: u64) -> Vec<Pte> {
        let ptes = self
            .unflushed
            .get(&vpn)
            .into_iter()
            .flatten()
            .map(|&(p, _)| p);
        let pmds = self
            .unflushed_pmds
            .get(&(vpn / PMD_PAGES))
            .into_iter()
            .flatten()
            .map(|(head, _)| pmd_subpage(head, vpn % PMD_PAGES));
        ptes.chain(pmds).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_only_the_changes_made_before_it_started() {
        let mut pt = PageTable::default();
        pt.set(1, Pte::present(7, true, true));
        pt.set(1, Pte::present(7, true, false)); // write-protect: recorded
        let mark = pt.flush_mark(); // a flush starts (its callbacks run)...
        pt.remove(1); // ...while another CPU unmaps the page
        pt.flushed(0, 10, mark);
        let left: Vec<Pte> = pt.unflushed(1);
        assert_eq!(
            left,
            vec![Pte::present(7, true, false)],
            "the unmap still needs its flush"
        );
        pt.flushed(0, 10, pt.flush_mark());
        assert_eq!(pt.unflushed(1).len(), 0);
    }

    #[test]
    fn every_downgrade_is_recorded_including_migration_entries() {
        let mut pt = PageTable::default();
        let rw = Pte::present(3, true, true);
        pt.set(2, rw);
        pt.set(
            2,
            Pte {
                kind: PteKind::Migration { pfn: 3 },
                ..rw
            },
        );
        assert_eq!(pt.unflushed(2), vec![rw], "migration entries are read-only");
        // Upgrades and bit changes are not downgrades.
        let mut pt = PageTable::default();
        pt.set(4, Pte::present(5, true, false));
        pt.set(4, Pte::present(5, true, true));
        assert_eq!(pt.unflushed(4).len(), 0);
        assert_eq!(
            Pte::present(5, true, false).access(),
            (Some(5), true, false)
        );
    }
}

/// What an access needs from a PTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

impl Access {
    pub(crate) fn is_write(self) -> bool {
        self == Access::Write
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// Whether `pte` already allows a CPU `access` (no fault needed).
pub(crate) fn satisfies(pte: &Pte, access: Access) -> bool {
    matches!(pte.kind, PteKind::Present { .. }) && pte.read && (!access.is_write() || pte.write)
}
