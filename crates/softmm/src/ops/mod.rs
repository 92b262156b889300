//! The primary-MMU operations, each firing the hooks where Linux's core mm
//! does (the README's call-site table, "softmm: the software primary MMU",
//! gives the event and range of every row).
//!
//! | operation (`Mm::…`) | file | Linux |
//! | --- | --- | --- |
//! | `mmap`, `mmap_fixed`, `munmap`, `mremap`, `mremap_fixed` | `map.rs` | `do_mmap`, `do_vmi_munmap`, `mremap` / `move_vma` |
//! | `madvise_dontneed`, `madvise_free`, `oom_reap` | `map.rs` | `madvise_dontneed_free`, `__oom_reap_task_mm` |
//! | `fault` (and `MmapRead::fault`), `read`, `write`, `read_u64`, `write_u64` | `fault.rs` | `handle_mm_fault` (`do_anonymous_page`, `wp_page_copy`, `do_swap_page`) |
//! | `mprotect`, `fork`, `clear_soft_dirty`, `writeback` | `protect.rs` | `change_protection`, `dup_mmap` / `copy_pte_range`, `clear_refs`, `folio_mkclean` |
//! | `age`, `clear_young`, `test_young`, `swap_out` | `reclaim.rs` | `folio_referenced`, `try_to_unmap` |
//! | `migrate_to_ram`, `migrate_to_device`, `migrate_pages`, `make_device_exclusive`, `ksm_merge` | `migrate.rs` | `migrate_vma_*`, `migrate_pages`, `make_device_exclusive_range`, KSM `replace_page` |
//! | `madvise_hugepage`, `madvise_nohugepage`, `collapse` (and the THP fault, PMD split and THP split every other operation uses) | `huge.rs` | `do_huge_pmd_anonymous_page`, `__split_huge_pmd`, `split_huge_page`, `collapse_huge_page` |
//! | hugetlb (`MapKind::Hugetlb`): its fault, COW, unmap, mprotect, fork and mremap rows | `hugetlb.rs` | `hugetlb_fault`, `hugetlb_wp`, `__unmap_hugepage_range`, `hugetlb_change_protection`, `copy_hugetlb_page_range`, `move_hugetlb_page_tables` |
//! | `MmapRead::range_fault`, `pin` (the secondary's side) | `../hmm.rs` | `hmm_range_fault`, `pin_user_pages` |
//!
//! Shared by all of them, in `../mm.rs`: the invalidation pair, the TLB
//! flush, the mmu_gather (`Gather`), and the page-table-lock guard whose
//! methods are the only way to change a PTE.

pub(crate) mod fault;
pub mod huge;
pub(crate) mod hugetlb;
pub mod map;
pub mod migrate;
pub mod protect;
pub mod reclaim;
