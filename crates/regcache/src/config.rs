//! The cache's configuration ([`Config`]) and what it reports
//! ([`CacheStats`], [`Usage`]).

use mmu_notifier::sync::AtomicU64;

#[cfg(doc)]
use crate::{CacheError, RegCache};

/// Tuning of a [`RegCache`]; [`Config::default`] is a safe start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Cached registrations at most; past it the least recently used one
    /// leaves the cache (it stays registered while a guard holds it).
    pub max_cached: usize,
    /// Bytes of registrations that left the cache but are still registered
    /// (waiting for teardown or held by guards). Teardown of what left the
    /// cache runs at every miss; past this bound it also runs on hits, so
    /// invalidated memory does not stay registered (and pinned) for long
    /// in a cache that only hits.
    pub max_unreleased_bytes: u64,
    /// Registrations of one lookup thrown away because an invalidation of
    /// the range raced them, before the lookup gives up with
    /// [`CacheError::Busy`]. The address-space watch and the interval
    /// notifier are kept across these attempts.
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_cached: 1024,
            max_unreleased_bytes: 16 << 20,
            max_attempts: 16,
        }
    }
}

/// Counters of one cache (all relaxed; read them for reports).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that found nothing cached.
    pub misses: AtomicU64,
    /// Successful `Registrar::register` calls.
    pub registrations: AtomicU64,
    /// `Registrar::deregister` calls.
    pub deregistrations: AtomicU64,
    /// `Registrar::deregister` calls that reported an error.
    pub deregister_failures: AtomicU64,
    /// Registrations taken out of the cache by invalidations.
    pub invalidated: AtomicU64,
    /// Registrations evicted (LRU limit, or to make room on the device).
    pub evicted: AtomicU64,
    /// Registrations thrown away because an invalidation raced them.
    pub retries: AtomicU64,
    /// Lookups that failed with [`CacheError::Exhausted`].
    pub exhausted: AtomicU64,
    /// Lookups that failed with [`CacheError::Busy`].
    pub busy: AtomicU64,
}

/// What the cache holds on the device now (see [`RegCache::usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Registrations in the cache.
    pub cached: usize,
    /// Live device handles: cached, left the cache but not yet torn down,
    /// or held only by guards.
    pub live_handles: usize,
    /// Their bytes.
    pub live_bytes: u64,
    /// Bytes of live handles that left the cache.
    pub unreleased_bytes: u64,
}
