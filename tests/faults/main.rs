//! Faults: crashes, disk errors, torn logs, power cuts, network cuts, odd values, hostile clients, durability.
//!
//! One test binary for these modules (each was its own binary): one link of eps and of the shared
//! harness instead of one per file.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod durability;
mod fault_compact;
mod fault_crash;
mod fault_disk;
mod fault_identity;
mod fault_infra;
mod fault_netcut;
mod fault_power;
mod fault_torn_log;
mod fault_values;
mod hostile_input;
