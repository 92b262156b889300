//! Frame numbers as the rest of the crate and secondaries hold them: the
//! zero page's, and [`FrameRef`] (a frame with the generation it had). A
//! leaf module: page-table entries, physical memory and the oracle's
//! record all use it.

/// Frame number of the shared zero page (never freed, never written).
pub const ZERO_PFN: u64 = 0;

/// Frames in a huge page (a THP or a hugetlb page): the pages one PMD
/// entry maps.
pub const HPAGE_PMD_NR: u64 = 512;

/// A frame as seen at one moment: its number and generation. Stale once the
/// frame is freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameRef {
    /// Frame number.
    pub pfn: u64,
    /// Generation the frame had when this handle was taken.
    pub gen: u64,
}
