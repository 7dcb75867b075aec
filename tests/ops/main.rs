//! The command line, operability (errors, status, metrics, health) and the deployment pack.
//!
//! One test binary for these modules (each was its own binary): one link of eps and of the shared
//! harness instead of one per file.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod cli;
mod deploy;
mod operability;
