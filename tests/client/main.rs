//! The client: failover over several servers and resumable runs.
//!
//! One test binary for these modules (each was its own binary): one link of eps and of the shared
//! harness instead of one per file.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod client_failover;
mod client_resume;
