//! HTTP contract: ingest, validation, security, TLS, the console, signals and start-up.
//!
//! One test binary for these modules (each was its own binary): one link of eps and of the shared
//! harness instead of one per file.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod batch_ingest;
mod console;
mod console_browser;
mod http_validation;
mod pg_tls;
mod security;
mod server_tls;
mod signals;
mod startup;
