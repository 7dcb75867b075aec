//! JetStream mode: the log on a stream, processing its partitions, a three-node cluster.
//!
//! One test binary for these modules (each was its own binary): one link of eps and of the shared
//! harness instead of one per file.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod nats_cluster;
mod nats_log;
mod nats_processing;
