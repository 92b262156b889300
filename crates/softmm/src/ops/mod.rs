//! The primary-MMU operations, each firing the hooks of spec section 7.

pub(crate) mod fault;
pub mod map;
pub mod migrate;
pub mod protect;
pub mod reclaim;
