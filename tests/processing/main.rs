//! Processing into the stores: revenue on both backends, concurrency, dead letters, adopted schemas, de-duplication horizon, property checks.
//!
//! One test binary for these modules (each was its own binary): one link of eps and of the shared
//! harness instead of one per file.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod adopted_schema;
mod concurrent_processors;
mod dead_letter;
mod dedup_horizon;
mod fuzz_properties;
mod revenue;
