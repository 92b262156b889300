//! The primary-MMU operations, each firing the hooks where Linux's core mm does (the table is in the
//! README, "softmm: the software primary MMU").

pub(crate) mod fault;
pub mod map;
pub mod migrate;
pub mod protect;
pub mod reclaim;
