//! What a JetStream acknowledgement promises: the nats-server version eps is connected to (from the
//! connection's INFO), the stream's replicas, and whether the servers sync before acknowledging.
//!
//! Nothing a client can reach over the NATS protocol says the sync setting: neither the INFO a server
//! sends on connecting nor `$JS.API.INFO` (account info) carries it; only the monitoring port's
//! `/varz` and the system account do. So it is declared by the operator (`--nats-sync-always`, for
//! servers run with `jetstream { sync_interval: always }`), and eps checks what it can see cannot
//! contradict it: nats-server before 2.10 has no such setting (2.9 refuses `sync_interval`), so there a
//! declaration is a mistake, which the server answers with 503s until it is fixed.

use serde::Serialize;

/// The first nats-server release that accepts `jetstream { sync_interval: always }`.
pub const SYNC_ALWAYS_SINCE: (u32, u32) = (2, 10);

/// Whether the servers sync a message to disk before acknowledging it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncSetting {
    /// Declared with `--nats-sync-always` on a server that can do it: a 200 means fsynced on as many
    /// servers as acknowledge (a majority of the replicas).
    Always,
    /// The server cannot sync before acknowledging (nats-server 2.9): a 200 means in memory of a
    /// majority, on disk within its sync interval (2 minutes by default).
    NotBeforeAck,
    /// Not declared, on a server that could: not known.
    Unknown,
    /// Declared, on a server that cannot: a configuration mistake.
    Contradicted,
}

/// What the connected server and the stream promise; `/readyz` and `eps status` show it, and the
/// server and the processors log [`Promise::line`] when it becomes known or changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promise {
    /// The connected nats-server's version, as its INFO says (one node's, in a cluster).
    pub server_version: String,
    pub stream: String,
    /// Copies the stream keeps of each message.
    pub replicas: usize,
    pub sync: SyncSetting,
    /// The whole promise in words (the line logged).
    pub summary: String,
}

impl Promise {
    /// The promise of `version` (the server's INFO), a stream of `replicas`, and the operator's
    /// declaration that the servers sync always.
    pub fn new(version: &str, stream: &str, replicas: usize, sync_declared: bool) -> Promise {
        let capable = can_sync_always(version);
        let sync = match (capable, sync_declared) {
            (Some(false), true) => SyncSetting::Contradicted,
            (Some(false), false) => SyncSetting::NotBeforeAck,
            (_, true) => SyncSetting::Always,
            (_, false) => SyncSetting::Unknown,
        };
        let said = match sync {
            SyncSetting::Always => {
                "always (declared with --nats-sync-always; not visible over the NATS protocol)".to_string()
            }
            SyncSetting::NotBeforeAck => format!(
                "not before acknowledging (nats-server {version} cannot; a 200 is in memory of a majority, on disk \
                 within the sync interval, 2 min by default)"
            ),
            SyncSetting::Unknown => {
                "unknown (not visible over the NATS protocol; give --nats-sync-always if every server \
                              runs with sync_interval: always)"
                    .to_string()
            }
            SyncSetting::Contradicted => format!(
                "CONTRADICTED: --nats-sync-always is given but nats-server {version} cannot sync before acknowledging \
                 (2.10 or later can, with sync_interval: always)"
            ),
        };
        Promise {
            server_version: version.to_string(),
            stream: stream.to_string(),
            replicas,
            sync,
            summary: format!("nats-server {version}, stream {stream} with {replicas} replicas, sync: {said}"),
        }
    }

    /// The one line logged at start-up (and when it changes).
    pub fn line(&self) -> String {
        format!("JetStream promise: {}", self.summary)
    }
}

/// Whether nats-server `version` accepts `sync_interval: always` (`None`: the version does not parse).
pub fn can_sync_always(version: &str) -> Option<bool> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= SYNC_ALWAYS_SINCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_2_10_cannot_sync_always() {
        assert_eq!(can_sync_always("2.9.10"), Some(false));
        assert_eq!(can_sync_always("2.10.0"), Some(true));
        assert_eq!(can_sync_always("v2.12.8"), Some(true));
        assert_eq!(can_sync_always("3.0.0-beta"), Some(true));
        assert_eq!(can_sync_always(""), None);
    }

    #[test]
    fn a_declaration_the_version_contradicts_is_said() {
        let p = Promise::new("2.9.10", "S", 3, true);
        assert_eq!(p.sync, SyncSetting::Contradicted);
        assert!(p.line().contains("CONTRADICTED"), "{}", p.line());
        assert_eq!(Promise::new("2.9.10", "S", 1, false).sync, SyncSetting::NotBeforeAck);
        assert_eq!(Promise::new("2.12.8", "S", 3, true).sync, SyncSetting::Always);
        assert_eq!(Promise::new("2.12.8", "S", 3, false).sync, SyncSetting::Unknown);
        assert_eq!(
            Promise::new("2.12.8", "EPS_EVENTS", 3, true).line(),
            "JetStream promise: nats-server 2.12.8, stream EPS_EVENTS with 3 replicas, sync: always (declared with \
             --nats-sync-always; not visible over the NATS protocol)"
        );
    }
}
