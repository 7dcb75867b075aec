//! eps: an event processing system.
//!
//! Data flow: `client` → HTTP → `server` → `log` (durable, group-committed JSON Lines) → `processor`
//! → `store` (revenue totals + checkpoint, one transaction) → `server` answers `GET /userEvents/:id`.
//! See ARCHITECTURE.md for the invariants.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod event;
pub mod fsutil;
pub mod log;
pub mod money;
pub mod ops;
pub mod processor;
pub mod server;
pub mod store;
pub mod telemetry;
