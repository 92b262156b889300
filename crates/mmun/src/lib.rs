//! The library behind the `mmun` tool: the stress workload, the scenario
//! runner, the trace exporter and the shared set-up, usable from tests and
//! other tools.
#![forbid(unsafe_code)]

pub mod progress;
pub mod rng;
pub mod scenario;
pub mod stress;
pub mod trace;
pub mod world;
