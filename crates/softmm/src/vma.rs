//! Virtual memory areas and the shared objects behind shared mappings.

use std::collections::BTreeMap;
use std::sync::Arc;

use mmu_notifier::sync::{self, Mutex};

use crate::error::{Error, Result};
use crate::frame::PhysMem;
use crate::pfn::FrameRef;
use crate::PAGE_SIZE;

/// Protection bits of a mapping (`PROT_READ` / `PROT_WRITE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Prot {
    /// `PROT_NONE`.
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
    };
    /// `PROT_READ`.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// `PROT_READ | PROT_WRITE`.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
}

/// What backs a mapping.
#[derive(Clone, Debug)]
pub enum Backing {
    /// Private anonymous memory (COW on fork).
    AnonPrivate,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`).
    AnonShared(Arc<SharedObject>),
    /// A shared mapping of a file-like object.
    File(Arc<SharedObject>),
    /// hugetlb memory (`MAP_HUGETLB`): fixed 2 MiB pages, private (COW on
    /// fork; `None`) or shared (a hugetlbfs object).
    Hugetlb(Option<Arc<SharedObject>>),
}

/// What kind of mapping to create (the object for shared kinds is made or
/// given by the caller).
#[derive(Clone, Debug)]
pub enum MapKind {
    /// Private anonymous memory.
    AnonPrivate,
    /// Shared anonymous memory: a new object, shared with fork children.
    AnonShared,
    /// hugetlb memory of 2 MiB pages (`MAP_HUGETLB`, private or
    /// `MAP_SHARED`: a new hugetlbfs object shared with fork children).
    /// Address and length are rounded to 2 MiB as Linux does (a fixed
    /// address must be aligned).
    Hugetlb {
        /// `MAP_SHARED`.
        shared: bool,
    },
    /// A shared mapping of `file` starting at page `pgoff`.
    File {
        /// The file.
        file: Arc<SharedObject>,
        /// First page of the file mapped.
        pgoff: u64,
    },
}

/// A file-like object (or the memory of a shared anonymous mapping): a page
/// cache holding one reference on each of its frames.
pub struct SharedObject {
    phys: Arc<PhysMem>,
    /// Frames by page offset (ordered, so that the object's frames are
    /// freed in the same order every run: frame reuse, and so where huge
    /// pages fit, stays a function of the operations).
    pages: Mutex<BTreeMap<u64, u64>>,
    /// hugetlbfs objects: the head frame of each 2 MiB page by its index.
    huge_pages: Mutex<BTreeMap<u64, u64>>,
    len_pages: u64,
}

impl std::fmt::Debug for SharedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedObject")
            .field("len_pages", &self.len_pages)
            .finish()
    }
}

/// The frame `pages` holds at `index`, or a new one from `alloc`, which
/// `pages` then keeps (with the reference `alloc` handed out).
fn frame_or_alloc(
    pages: &Mutex<BTreeMap<u64, u64>>,
    index: u64,
    alloc: impl FnOnce() -> Result<FrameRef>,
) -> Result<u64> {
    let mut pages = sync::lock(pages);
    if let Some(&pfn) = pages.get(&index) {
        return Ok(pfn);
    }
    let f = alloc()?;
    pages.insert(index, f.pfn);
    Ok(f.pfn)
}

impl SharedObject {
    /// A file of `len_pages` pages whose content starts with `content`
    /// (the rest reads as zeros). Frames are allocated when first used.
    pub fn new_file(phys: &Arc<PhysMem>, len_pages: u64, content: &[u8]) -> Result<Arc<Self>> {
        let obj = Arc::new(SharedObject {
            phys: phys.clone(),
            pages: Mutex::new(BTreeMap::new()),
            huge_pages: Mutex::new(BTreeMap::new()),
            len_pages,
        });
        for (i, chunk) in content.chunks(PAGE_SIZE as usize).enumerate() {
            let pfn = obj.page(i as u64)?;
            phys.write_frame(phys.frame_ref(pfn), 0, chunk)?;
        }
        Ok(obj)
    }

    pub(crate) fn anon(phys: &Arc<PhysMem>) -> Arc<Self> {
        Arc::new(SharedObject {
            phys: phys.clone(),
            pages: Mutex::new(BTreeMap::new()),
            huge_pages: Mutex::new(BTreeMap::new()),
            len_pages: u64::MAX / PAGE_SIZE,
        })
    }

    /// The head frame of 2 MiB page `index` of a hugetlbfs object,
    /// allocating a zeroed one if needed (the object keeps a reference on
    /// each of its frames).
    pub(crate) fn huge_page(&self, index: u64) -> Result<u64> {
        frame_or_alloc(&self.huge_pages, index, || self.phys.alloc_huge())
    }

    /// Size in pages.
    pub fn len_pages(&self) -> u64 {
        self.len_pages
    }

    /// The frame of page `pgoff`, allocating a zeroed one if needed (the
    /// object keeps its own reference).
    pub(crate) fn page(&self, pgoff: u64) -> Result<u64> {
        frame_or_alloc(&self.pages, pgoff, || self.phys.alloc_frame())
    }

    /// Reads `buf.len()` bytes at byte `offset` of the file (pread).
    pub fn pread(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (pg, off) = (pos / PAGE_SIZE, (pos % PAGE_SIZE) as usize);
            let n = (PAGE_SIZE as usize - off).min(buf.len() - done);
            let pfn = self.page(pg)?;
            self.phys
                .read_frame(self.phys.frame_ref(pfn), off, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for SharedObject {
    fn drop(&mut self) {
        let pages = std::mem::take(self.pages.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, pfn) in pages {
            self.phys.put_frame(pfn);
        }
        let huge = std::mem::take(self.huge_pages.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, head) in huge {
            for pfn in head..head + crate::HPAGE_PMD_NR {
                self.phys.put_frame(pfn);
            }
        }
    }
}

/// A virtual memory area `[start, end)`.
#[derive(Clone, Debug)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Protection.
    pub prot: Prot,
    /// What backs it.
    pub backing: Backing,
    /// Page offset into the shared object of `start`.
    pub pgoff: u64,
    /// An anonymous page was ever faulted in (Linux `anon_vma` set); fork
    /// only copies page tables of such VMAs.
    pub anon_vma: bool,
    /// `madvise(MADV_HUGEPAGE)` was given (Linux `VM_HUGEPAGE`): faults in
    /// its 2 MiB-aligned blocks allocate transparent huge pages (the model
    /// runs THP in `madvise` mode).
    pub hugepage: bool,
}

impl Vma {
    /// Private mapping (copy-on-write; Linux `is_cow_mapping`).
    pub fn is_private(&self) -> bool {
        matches!(self.backing, Backing::AnonPrivate)
    }

    /// Anonymous memory, private or shared (Linux `vma_is_anonymous` plus
    /// shmem-backed shared anonymous memory).
    pub fn is_anonymous(&self) -> bool {
        matches!(self.backing, Backing::AnonPrivate | Backing::AnonShared(_))
    }

    /// hugetlb memory (Linux `is_vm_hugetlb_page`).
    pub fn is_hugetlb(&self) -> bool {
        matches!(self.backing, Backing::Hugetlb(_))
    }

    /// The object behind a shared mapping of base pages (hugetlbfs objects
    /// are reached through [`Backing::Hugetlb`]).
    pub(crate) fn object(&self) -> Option<&Arc<SharedObject>> {
        match &self.backing {
            Backing::AnonPrivate | Backing::Hugetlb(_) => None,
            Backing::AnonShared(o) | Backing::File(o) => Some(o),
        }
    }

    /// Page offset in the object of `addr`.
    /// Whether the 2 MiB block of `addr` may be a transparent huge page:
    /// private anonymous memory under `MADV_HUGEPAGE`, the whole block
    /// inside this VMA (Linux `thp_vma_suitable_order` plus `madvise` mode).
    pub(crate) fn thp_block(&self, addr: u64) -> Option<u64> {
        let block = addr & !(crate::PMD_SIZE - 1);
        (self.hugepage
            && self.is_private()
            && self.start <= block
            && block + crate::PMD_SIZE <= self.end)
            .then_some(block)
    }

    pub(crate) fn pgoff_of(&self, addr: u64) -> u64 {
        self.pgoff + (addr - self.start) / PAGE_SIZE
    }

    /// The part `[start, end)` of this VMA (with its object offset).
    pub(crate) fn slice(&self, start: u64, end: u64) -> Vma {
        let mut v = self.clone();
        v.pgoff = self.pgoff_of(start.max(self.start));
        v.start = start.max(self.start);
        v.end = end.min(self.end);
        v
    }
}

/// The VMA set of an address space, keyed by start address.
#[derive(Default, Debug)]
pub(crate) struct Vmas {
    map: BTreeMap<u64, Vma>,
}

impl Vmas {
    pub(crate) fn find(&self, addr: u64) -> Option<&Vma> {
        self.map
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// VMAs overlapping `[start, end)`, clipped to it.
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Vec<Vma> {
        let first = self.find(start).map_or(start, |v| v.start);
        self.map
            .range(first..end)
            .map(|(_, v)| v)
            .filter(|v| v.end > start)
            .map(|v| v.slice(start, end))
            .collect()
    }

    /// The `[start, end)` of each VMA part inside `[start, end)` that
    /// `keep` accepts, in address order.
    pub(crate) fn ranges(
        &self,
        start: u64,
        end: u64,
        keep: impl Fn(&Vma) -> bool,
    ) -> Vec<(u64, u64)> {
        self.overlapping(start, end)
            .into_iter()
            .filter(|v| keep(v))
            .map(|v| (v.start, v.end))
            .collect()
    }

    /// Whether `[start, end)` is covered by VMAs without holes.
    pub(crate) fn covers(&self, start: u64, end: u64) -> Result<()> {
        let mut at = start;
        for v in self.overlapping(start, end) {
            if v.start != at {
                break;
            }
            at = v.end;
        }
        if at >= end {
            Ok(())
        } else {
            Err(Error::NotMapped {
                addr: at,
                why: "no VMA",
            })
        }
    }

    /// The VMA parts of `[start, end)`, which must have no hole.
    pub(crate) fn covering(&self, start: u64, end: u64) -> Result<Vec<Vma>> {
        self.covers(start, end)?;
        Ok(self.overlapping(start, end))
    }

    /// Splits so that `addr` is a VMA boundary (if inside one).
    pub(crate) fn split_at(&mut self, addr: u64) {
        let Some(v) = self.find(addr).cloned() else {
            return;
        };
        if v.start == addr {
            return;
        }
        self.map.insert(v.start, v.slice(v.start, addr));
        self.map.insert(addr, v.slice(addr, v.end));
    }

    /// Removes every VMA part inside `[start, end)` and returns them.
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        keys.into_iter()
            .filter_map(|k| self.map.remove(&k))
            .collect()
    }

    pub(crate) fn insert(&mut self, v: Vma) {
        self.map.insert(v.start, v);
    }

    /// Applies `f` to every VMA inside `[start, end)` after splitting at the
    /// range's ends.
    pub(crate) fn update_range(&mut self, start: u64, end: u64, mut f: impl FnMut(&mut Vma)) {
        self.split_at(start);
        self.split_at(end);
        for (_, v) in self.map.range_mut(start..end) {
            f(v);
        }
    }

    /// Whether `[start, end)` is free of VMAs.
    pub(crate) fn is_free(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).is_empty()
    }

    /// Lowest free range of `len` bytes at or above `base` starting at a
    /// multiple of `align` (a power of two).
    pub(crate) fn find_free_aligned(&self, base: u64, len: u64, align: u64) -> Option<u64> {
        let up = |a: u64| a.checked_add(align - 1).map(|x| x & !(align - 1));
        let mut at = up(base)?;
        for v in self.map.values() {
            if v.end <= at {
                continue;
            }
            if v.start >= at.checked_add(len)? {
                return Some(at);
            }
            at = up(v.end)?;
        }
        at.checked_add(len).map(|_| at)
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }

    pub(crate) fn clear(&mut self) -> Vec<Vma> {
        std::mem::take(&mut self.map).into_values().collect()
    }
}
