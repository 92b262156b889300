//! A registration cache kept exact by [`mmu_notifier`]: the pattern of UCX's
//! `ucs_rcache`, libfabric's MR cache and every RDMA, io_uring, GPU or DMA
//! user that registers application buffers with a device and wants to
//! register each buffer once, not once per I/O.
//!
//! The danger of such a cache is a *stale registration*: the application
//! frees a buffer (munmap, `free` of a large block, `realloc`, madvise
//! `DONTNEED`), new memory appears at the same address, and a lookup
//! returns the old registration, whose device pages are the old ones. The
//! device then reads or writes memory the application no longer sees:
//! silent data loss. This crate gives each registration an interval
//! notifier ([`mmu_notifier::IntervalNotifier`]), so a change to the memory
//! under it takes it out of the cache before the change can be observed.
//!
//! Three parts, decoupled by traits:
//! * [`AddressSpace`]: the memory (this process through the `uffd` crate's
//!   `ProcessMm`, a software MMU in tests, your kernel's page tables);
//! * [`Registrar`]: the device (an io_uring fixed-buffer table in the
//!   `uring-registrar` crate; `ibv_reg_mr`; `cudaHostRegister`; VFIO);
//! * [`RegCache`]: the cache, which hands out [`Entry`] guards, and
//!   lends a registration to a closure without a guard
//!   ([`RegCache::with_hit`]).
//!
//! # The hit path
//! A hit takes no lock and writes no shared word: the cache keeps its
//! registrations by start page in a table whose slots are RCU-published
//! (`mmu_notifier::rcu::RcuSlots`) and reads it inside a read-side section
//! of the address space's SRCU domain, a thread-local counter. A slot is
//! one cache line that holds what the hit decides on (the registration's
//! range and access) and the device's [`Registrar::hit_key`] beside the
//! pointer, under a per-slot sequence count: a hit that needs only the key
//! ([`Hit::key`]) costs one cache miss where registrations are many,
//! reading the handle itself ([`Hit::handle`]) a second.
//! [`RegCache::with_hit`] is that hit alone; [`RegCache::get`] tries it
//! first and takes a guard (two reference-count increments), then falls
//! back to the locked index (a lookup that does not start in a
//! registration's first page). A registration that left the cache is torn
//! down only after a grace period, so never under a running hit.
//!
//! # Lifecycle
//! * [`RegCache::get`] returns a guard; clones of it hold the registration
//!   too, dropping one puts it.
//! * A registration leaves the cache when an invalidation overlaps it, when
//!   the LRU limit ([`Config::max_cached`]) or the device's [`Limits`]
//!   evict it, or when the cache is dropped. It is then invalid
//!   ([`Entry::is_valid`]) and no lookup returns it again.
//! * [`Registrar::deregister`] runs exactly once per handle, after the
//!   registration left the cache and its last guard is gone; never inside a
//!   notifier callback (so never on a userfaultfd monitor thread) and never
//!   under the cache lock. Teardown of what left the cache is deferred to
//!   the next miss (or hit, past [`Config::max_unreleased_bytes`]), to
//!   [`RegCache::reap`] and [`RegCache::purge_unused`].
//! * Device limits count every live handle, including invalidated ones
//!   still held by guards. When a registration would not fit, or the device
//!   says [`RegError::Exhausted`], the cache deregisters what nobody holds
//!   (least recently used first) and retries once, then returns
//!   [`CacheError::Exhausted`].
//! * A registration raced by an invalidation is deregistered and made
//!   again, keeping the watch and the notifier, at most
//!   [`Config::max_attempts`] times, then [`CacheError::Busy`].
//!
//! # What is promised, and what is not
//! A lookup never returns a registration of memory that changed before the
//! lookup started, provided the [`AddressSpace`] delivers every change (its
//! [`flush`](AddressSpace::flush)). I/O *already in flight* through a
//! registration when the memory changes completes into the pages that were
//! registered: the device holds them (io_uring, RDMA and VFIO all pin), so
//! the memory is not corrupted, but the data lands in pages the
//! application no longer maps. Ordering I/O against the application's own
//! munmap of a buffer in use is the application's job, as without a cache.
//!
//! # Example
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use mmu_notifier::{Event, Range, Subscriptions};
//! use regcache::{Access, AddressSpace, RegCache, RegError, Registrar};
//!
//! /// An address space whose primary MMU calls the hooks itself.
//! struct Space(Subscriptions);
//! impl AddressSpace for Space {
//!     type Watch = ();
//!     type Error = std::convert::Infallible;
//!     fn subscriptions(&self) -> &mmu_notifier::SubscriptionsRef { &self.0 }
//!     fn watch(&self, _: u64, _: u64) -> Result<(), Self::Error> { Ok(()) }
//! }
//!
//! /// A device handing out keys.
//! #[derive(Default)]
//! struct Nic { live: AtomicU64 }
//! impl Registrar for Nic {
//!     type Handle = u64;
//!     fn register(&self, start: u64, _end: u64, _: Access) -> Result<u64, RegError> {
//!         self.live.fetch_add(1, Ordering::Relaxed);
//!         Ok(start >> 12)
//!     }
//!     fn deregister(&self, _: u64) -> Result<(), RegError> {
//!         self.live.fetch_sub(1, Ordering::Relaxed);
//!         Ok(())
//!     }
//! }
//!
//! let cache = RegCache::new(Space(Subscriptions::new()), Nic::default());
//! let e = cache.get(0x10000, 8192, Access::READ_WRITE)?;
//! assert_eq!(cache.get(0x10100, 100, Access::READ)?.id(), e.id()); // a hit
//! // The primary unmaps the first page: the registration leaves the cache.
//! let subs = &cache.space().0;
//! subs.invalidate_range_start(Range::new(0x10000, 0x11000, Event::Unmap)?).end();
//! assert!(!e.is_valid());
//! assert_ne!(cache.get(0x11000, 4096, Access::READ)?.id(), e.id());
//! drop(e); // the last guard: deregistered at the next teardown
//! cache.reap();
//! assert_eq!(cache.registrar().live.load(Ordering::Relaxed), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod access;
mod cache;
mod config;
mod entry;
mod error;
mod hits;
mod index;
mod reg;
mod registrar;
mod space;
mod state;

pub use access::Access;
pub use cache::RegCache;
pub use config::{CacheStats, Config, Usage};
pub use entry::{Entry, Hit};
pub use error::CacheError;
pub use registrar::{BoxError, Limits, RegError, Registrar};
pub use space::AddressSpace;
