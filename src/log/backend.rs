//! Which log a command uses, decided once from its `--log` flag: the file log in the data directory,
//! or a NATS JetStream stream. The server, the processor and `eps status` match on [`LogBackend`].

use super::nats::NatsLogOptions;

/// The log a command appends to or reads from.
#[derive(Debug, Clone)]
pub enum LogBackend {
    /// The file log in the data directory (no `--log`).
    File,
    /// A JetStream stream (`--log nats://…`): its options, `url` included.
    JetStream(NatsLogOptions),
}

impl LogBackend {
    /// The backend of a `--log` value, which the command line has already checked is a JetStream URL
    /// (`cli::log_url`, the same check for every command); `nats` gives the stream's options for it.
    pub fn from_flag(log: Option<String>, nats: impl FnOnce(String) -> NatsLogOptions) -> LogBackend {
        match log {
            None => LogBackend::File,
            Some(url) => LogBackend::JetStream(nats(url)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_names_the_backend() {
        let nats = NatsLogOptions::new;
        assert!(matches!(LogBackend::from_flag(None, nats), LogBackend::File));
        assert!(matches!(
            LogBackend::from_flag(Some("nats://a:4222,b:4222".into()), nats),
            LogBackend::JetStream(o) if o.url == "nats://a:4222,b:4222"
        ));
    }
}
