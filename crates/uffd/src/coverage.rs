//! How many watches cover each part of the address space: a range is
//! unregistered from the userfaultfd when the last watch over it goes.

use std::collections::BTreeMap;

/// Disjoint segments `start -> (end, count)`, every count at least 1.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    segs: BTreeMap<u64, (u64, u32)>,
}

impl Coverage {
    /// Splits the segment containing `x` (strictly inside) at `x`.
    fn split_at(&mut self, x: u64) {
        let Some((&s, &(e, c))) = self.segs.range(..x).next_back() else {
            return;
        };
        if s < x && x < e {
            self.segs.insert(s, (x, c));
            self.segs.insert(x, (e, c));
        }
    }

    /// One more watch over `[start, end)`.
    pub(crate) fn add(&mut self, start: u64, end: u64) {
        self.split_at(start);
        self.split_at(end);
        let mut at = start;
        let inside: Vec<u64> = self.segs.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if at < s {
                self.segs.insert(at, (s, 1));
            }
            let seg = self.segs.get_mut(&s).expect("segment listed above");
            seg.1 += 1;
            at = seg.0;
        }
        if at < end {
            self.segs.insert(at, (end, 1));
        }
    }

    /// One watch fewer over `[start, end)` (which [`add`](Self::add)
    /// covered); returns the ranges no watch covers any more, coalesced.
    pub(crate) fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.segs.range(start..end).map(|(&s, _)| s).collect();
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for s in inside {
            let (e, c) = self.segs[&s];
            if c > 1 {
                self.segs.insert(s, (e, c - 1));
                continue;
            }
            self.segs.remove(&s);
            match freed.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => freed.push((s, e)),
            }
        }
        freed
    }

    /// Whether any watch covers `addr`.
    #[cfg(test)]
    pub(crate) fn covers(&self, addr: u64) -> bool {
        self.segs
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, &(e, _))| addr < e)
    }

    /// Number of segments (a measure of fragmentation).
    pub(crate) fn segments(&self) -> usize {
        self.segs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_watches_free_only_what_no_watch_covers() {
        let mut c = Coverage::default();
        c.add(0x1000, 0x5000);
        c.add(0x3000, 0x8000);
        assert!(c.covers(0x1000) && c.covers(0x7fff) && !c.covers(0x8000));
        assert_eq!(c.remove(0x1000, 0x5000), vec![(0x1000, 0x3000)]);
        assert!(!c.covers(0x2000) && c.covers(0x4000));
        assert_eq!(c.remove(0x3000, 0x8000), vec![(0x3000, 0x8000)]);
        assert_eq!(c.segments(), 0);
    }

    #[test]
    fn a_watch_inside_another_keeps_the_range() {
        let mut c = Coverage::default();
        c.add(0, 0x10000);
        c.add(0x4000, 0x5000);
        c.add(0x4000, 0x5000);
        assert!(c.remove(0x4000, 0x5000).is_empty());
        assert!(c.remove(0, 0x10000) == vec![(0, 0x4000), (0x5000, 0x10000)]);
        assert_eq!(c.remove(0x4000, 0x5000), vec![(0x4000, 0x5000)]);
        assert_eq!(c.segments(), 0);
    }

    #[test]
    fn adjacent_freed_ranges_coalesce() {
        let mut c = Coverage::default();
        c.add(0x1000, 0x2000);
        c.add(0x2000, 0x3000);
        c.add(0x1000, 0x3000);
        assert!(c.remove(0x1000, 0x2000).is_empty());
        assert!(c.remove(0x2000, 0x3000).is_empty());
        assert_eq!(c.remove(0x1000, 0x3000), vec![(0x1000, 0x3000)]);
    }
}
