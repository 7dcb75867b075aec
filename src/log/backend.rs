//! Which log a command uses, decided once from its `--log` flag: the file log in the data directory,
//! or a NATS JetStream stream. The server, the processor and `eps status` match on [`LogBackend`].

use super::nats::{is_nats_url, NatsLogOptions};

/// The log a command appends to or reads from.
#[derive(Debug, Clone)]
pub enum LogBackend {
    /// The file log in the data directory (no `--log`).
    File,
    /// A JetStream stream (`--log nats://…`): its options, `url` included.
    JetStream(NatsLogOptions),
    /// A `--log` value that names no backend. Each command refuses it in its own words where it would
    /// open the log (`eps status` shows the file log instead, as it always has).
    Unsupported(String),
}

impl LogBackend {
    /// The backend a `--log` value names; `nats` gives the stream's options for a JetStream URL.
    pub fn from_flag(log: Option<String>, nats: impl FnOnce(String) -> NatsLogOptions) -> LogBackend {
        match log {
            None => LogBackend::File,
            Some(url) if is_nats_url(&url) => LogBackend::JetStream(nats(url)),
            Some(other) => LogBackend::Unsupported(other),
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
        assert!(matches!(LogBackend::from_flag(Some("tls://a:4222".into()), nats), LogBackend::JetStream(_)));
        assert!(
            matches!(LogBackend::from_flag(Some("http://a".into()), nats), LogBackend::Unsupported(u) if u == "http://a")
        );
    }
}
