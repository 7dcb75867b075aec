//! Configuration errors: settings eps refuses to start with. They exit with code 2 (usage error) at
//! once, before anything is served or retried, because waiting cannot fix them. The lowest layer, so
//! that every module that checks its settings can say so without depending on the configuration file.

/// A configuration eps refuses to run with (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
