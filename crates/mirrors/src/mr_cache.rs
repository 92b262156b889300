//! [`MrCache`]: the RDMA memory-region cache pattern (UCX `ucs_rcache`,
//! libfabric's MR cache) on a [`Primary`]: a [`regcache::RegCache`] whose
//! device pins through the primary ([`PinRegistrar`]), with every device
//! access through a registration checked by the coherence oracle
//! ([`MrCache::check`]).
//!
//! ```
//! use mirrors::MrCache;
//! use softmm::{MapKind, Mm, PhysMem, Prot};
//! let phys = PhysMem::new(64);
//! let mm = Mm::new(&phys);
//! let a = mm.mmap(4 * 4096, Prot::RW, MapKind::AnonPrivate).unwrap();
//! let cache = MrCache::new(mm.grab(), 16);
//! let r1 = cache.get(a, 8192, true).unwrap();
//! let r2 = cache.get(a, 4096, false).unwrap(); // hit: covered by r1
//! assert_eq!(r1.id(), r2.id());
//! mm.munmap(a, 4096).unwrap();
//! assert!(!r1.is_valid());
//! assert_ne!(cache.get(a + 4096, 4096, true).unwrap().id(), r1.id());
//! ```

use std::sync::Arc;

use mmu_notifier::SubscriptionsRef;
use regcache::{Access, CacheError, CacheStats, Config, Entry, RegCache, RegError, Registrar};

use crate::primary::{FramePrimary, MirrorError, Primary, Result};

/// A [`Primary`] as the registration cache's [`regcache::AddressSpace`].
#[derive(Debug)]
pub struct PrimarySpace<P>(Arc<P>);

impl<P: Primary> regcache::AddressSpace for PrimarySpace<P> {
    type Watch = P::Watch;
    type Error = MirrorError;

    fn subscriptions(&self) -> &SubscriptionsRef {
        self.0.subscriptions()
    }

    fn watch(&self, start: u64, len: u64) -> Result<P::Watch> {
        self.0.watch(start, len)
    }

    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}

/// The device of an [`MrCache`]: registering pins the pages through the
/// primary (`ibv_reg_mr`'s long-term pin), deregistering unpins them.
#[derive(Debug)]
pub struct PinRegistrar<P>(Arc<P>);

impl<P: Primary> Registrar for PinRegistrar<P> {
    type Handle = P::Pinned;

    fn register(
        &self,
        start: u64,
        end: u64,
        access: Access,
    ) -> std::result::Result<P::Pinned, RegError> {
        self.0
            .pin(start, end - start, access.writes())
            .map_err(|e| RegError::Unsupported(Box::new(e)))
    }

    fn deregister(&self, pinned: P::Pinned) -> std::result::Result<(), RegError> {
        drop(pinned);
        Ok(())
    }
}

/// A registration of an [`MrCache`] (a guard: the pin holds while it lives).
pub type MrEntry<P> = Entry<PrimarySpace<P>, PinRegistrar<P>>;

/// An RDMA-style memory-region cache over one address space, holding at
/// most `limit` registrations (least recently used evicted first).
pub struct MrCache<P: Primary> {
    cache: RegCache<PrimarySpace<P>, PinRegistrar<P>>,
    primary: Arc<P>,
}

impl<P: Primary> std::fmt::Debug for MrCache<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MrCache")
            .field("cache", &self.cache)
            .finish()
    }
}

fn access(write: bool) -> Access {
    if write {
        Access::READ_WRITE
    } else {
        Access::READ
    }
}

/// The mirror error a cache error stands for.
fn mirror_error(e: CacheError) -> MirrorError {
    let boxed = match e {
        CacheError::Unsupported { source, .. }
        | CacheError::Unwatchable { source, .. }
        | CacheError::AddressSpace(source)
        | CacheError::Device(source) => source,
        CacheError::Busy { .. } => return MirrorError::Busy,
        CacheError::Notifier(e) => return MirrorError::Notifier(e),
        CacheError::InvalidRequest { start, len, .. } => {
            return MirrorError::Primary(softmm::Error::InvalidRange { addr: start, len })
        }
        other => Box::new(other),
    };
    match boxed.downcast::<MirrorError>() {
        Ok(m) => *m,
        Err(b) => MirrorError::Backend(b),
    }
}

impl<P: Primary> MrCache<P> {
    /// An empty cache.
    pub fn new(primary: P, limit: usize) -> Self {
        let primary = Arc::new(primary);
        let config = Config {
            max_cached: limit,
            ..Config::default()
        };
        MrCache {
            cache: RegCache::with_config(
                PrimarySpace(primary.clone()),
                PinRegistrar(primary.clone()),
                config,
            ),
            primary,
        }
    }

    /// The registration cache itself.
    pub fn cache(&self) -> &RegCache<PrimarySpace<P>, PinRegistrar<P>> {
        &self.cache
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        self.cache.stats()
    }

    /// Registrations cached now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// A valid registration covering `[start, start + len)` (for writing if
    /// `write`), registering (pinning) one if none is cached; see
    /// [`RegCache::get`].
    ///
    /// # Errors
    /// The primary's watch and pin errors; [`MirrorError::Notifier`];
    /// [`MirrorError::Busy`].
    pub fn get(&self, start: u64, len: u64, write: bool) -> Result<MrEntry<P>> {
        self.cache
            .get(start, len, access(write))
            .map_err(mirror_error)
    }

    /// Tears down registrations that left the cache; see [`RegCache::reap`].
    pub fn reap(&self) {
        self.cache.reap();
    }
}

impl<P: FramePrimary> MrCache<P> {
    /// An access through a registration (a NIC DMA), checked by the oracle:
    /// the pin must hold, and while the registration is valid its pinned
    /// frame must be exactly what the primary maps at `addr` (the "never
    /// stale" promise, checked under the cache lock that invalidations take
    /// before the primary changes anything).
    ///
    /// # Errors
    /// [`MirrorError::Violation`]; [`MirrorError::Released`] for an
    /// invalidated registration (the caller must look up again);
    /// [`MirrorError::OutOfRange`] for an address the registration does not
    /// cover.
    pub fn check(&self, reg: &MrEntry<P>, addr: u64, write: bool) -> Result<()> {
        let (start, end) = (reg.start(), reg.end());
        if !(start..end).contains(&addr) {
            return Err(MirrorError::OutOfRange { addr, start, end });
        }
        let p = &self.primary;
        p.check_pinned(reg.handle(), addr, write)?;
        reg.while_valid(|pinned| {
            let frame = p.pinned_frame(pinned, addr).ok_or(MirrorError::Released)?;
            p.check_access(addr, frame, write)
        })
        .unwrap_or(Err(MirrorError::Released))
    }
}
