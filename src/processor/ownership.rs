//! Partition ownership for the JetStream processor: which processor applies which partitions.
//!
//! Every processor holds one PostgreSQL session (the membership session, [`Membership`]) and in it one
//! session-level advisory "member" lock in a slot of its own (so the processors can count each other)
//! plus one advisory lock per partition it owns. A processor's share is `ceil(partitions / members)`;
//! it gives back partitions above it and takes free ones below it, trying them from an offset of its
//! slot. The session's server-side TCP settings ([`SERVER_KEEPALIVE_IDLE`] and after) and its
//! [`idle_session_timeout`] make PostgreSQL end the session of a vanished or frozen processor, and its
//! locks with it. The locks only divide the work: correctness rests on the commits' compare-and-set.
//!
//! When the session ends: at once if the processor's machine closes the socket (the process died); if
//! the machine or its network vanished instead, the *server* must notice, since nothing is left on the
//! processor's side to close anything. So the membership session sets PostgreSQL's own TCP settings on
//! its backend's socket: the backend gives up about [`SERVER_GIVES_UP_AFTER`] after the last packet it
//! received from the processor, instead of the kernel's two hours. `idle_session_timeout` also ends a
//! session whose processor is reachable but stopped querying (frozen); every rebalance queries the
//! session, and a long commit pings it ([`Membership::kept_busy_during`]), so a working processor never
//! reaches it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use crate::log::user_key;
use crate::store::{pg_tls, StoreError};

/// This processor's PostgreSQL session, holding its member lock and one lock per partition it owns.
pub(super) struct Membership {
    client: tokio_postgres::Client,
    partitions_key: i32,
    members_key: i32,
    /// This processor's member lock among the stream's (`-1`: only observing).
    pub(super) slot: i32,
}

/// Most processors that can share one stream.
const MAX_MEMBERS: i32 = 1024;

/// PostgreSQL's `tcp_keepalives_idle` on the membership session: the backend's socket sends its first
/// keepalive probe after this long without a packet from the processor.
pub const SERVER_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// `tcp_keepalives_interval`: then one probe every this long.
pub const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// `tcp_keepalives_count`: the backend gives up after this many unanswered probes (Linux: when no
/// `tcp_user_timeout` is in force).
pub const SERVER_KEEPALIVE_COUNT: u32 = 3;
/// `tcp_user_timeout`: the backend gives up when what it sent stays unacknowledged this long, and
/// (Linux) when a keepalive probe is due this long after the last packet received.
pub const SERVER_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// The latest the backend of a vanished processor gives up, counted from the last packet it received:
/// the first probe due after [`SERVER_USER_TIMEOUT`] (5 + 2 + 2 + 2 s), which is also idle + count ×
/// interval where the user timeout does not apply (Linux clamps the probes to the user timeout: about
/// 10 s there; tests/faults/fault_netcut.rs measures it). The locks go with the backend; the survivors take
/// them at their next rebalance.
pub const SERVER_GIVES_UP_AFTER: Duration = Duration::from_secs(11);
/// The least `idle_session_timeout` of the membership session.
pub const IDLE_SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(60);

/// `idle_session_timeout` of the membership session: a processor queries its session at every
/// rebalance (and pings it during commits), so only one that stopped working (frozen, hung) stays
/// idle this long; PostgreSQL then ends the session and frees the partitions. At least
/// [`IDLE_SESSION_TIMEOUT_MIN`], and 20 rebalance rounds.
pub fn idle_session_timeout(rebalance_interval: Duration, poll_interval: Duration) -> Duration {
    IDLE_SESSION_TIMEOUT_MIN.max((rebalance_interval + poll_interval) * 20)
}

impl Membership {
    pub(super) async fn join(
        url: &str,
        stream: &str,
        idle_session_timeout: Duration,
    ) -> Result<Membership, StoreError> {
        let mut membership = Membership::observe(url, stream).await?;
        membership.make_server_give_up(idle_session_timeout).await?;
        for slot in 0..MAX_MEMBERS {
            if membership.try_lock(membership.members_key, slot).await? {
                membership.slot = slot;
                return Ok(membership);
            }
        }
        Err(StoreError::Other(format!("more than {MAX_MEMBERS} processors on stream {stream}")))
    }

    /// A session that sees the processors of `stream` without being one of them.
    pub(super) async fn observe(url: &str, stream: &str) -> Result<Membership, StoreError> {
        let (mut config, tls) = pg_tls::connect_config(url).map_err(|e| StoreError::Other(e.0))?;
        config.application_name("eps process (partition locks)");
        config.connect_timeout(Duration::from_secs(5));
        // This side's socket: a dead network ends the session for the processor within seconds, so it
        // stops believing it owns its partitions. The server's side is set in `make_server_give_up`.
        config.keepalives(true).keepalives_idle(SERVER_KEEPALIVE_IDLE);
        config.keepalives_interval(SERVER_KEEPALIVE_INTERVAL).keepalives_retries(SERVER_KEEPALIVE_COUNT);
        config.tcp_user_timeout(SERVER_USER_TIMEOUT);
        let (client, connection) = config.connect(tls).await.map_err(|e| match pg_tls::tls_refusal(&e) {
            // Not an outage: the store's own pool was refused the same way at start-up (see `pg_tls`).
            Some(why) => StoreError::Other(format!("the partition-lock session was refused by TLS: {why}")),
            None => StoreError::Unavailable(e.to_string()),
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "the partition-lock session ended");
            }
        });
        // Two 31-bit keys derived from the stream's name: one class for partitions, one for members.
        let base = (user_key(stream) & 0x3FFF_FFFF) as i32;
        Ok(Membership { client, partitions_key: base, members_key: base | 0x4000_0000, slot: -1 })
    }

    /// Sets, on the session's backend, when PostgreSQL ends it if the processor stops answering (see
    /// [`SERVER_KEEPALIVE_IDLE`] and after), then reads them back from the session and logs what is in
    /// force. A setting the server does not know (older than PostgreSQL 12 for `tcp_user_timeout`, 14
    /// for `idle_session_timeout`) is reported and skipped. Over a Unix socket the TCP settings read 0:
    /// they do not apply there (the processor is on the database's machine; its socket closes with it).
    async fn make_server_give_up(&self, idle_session_timeout: Duration) -> Result<(), StoreError> {
        let wanted: [(&str, u128, &str); 5] = [
            ("tcp_keepalives_idle", SERVER_KEEPALIVE_IDLE.as_secs().into(), "s"),
            ("tcp_keepalives_interval", SERVER_KEEPALIVE_INTERVAL.as_secs().into(), "s"),
            ("tcp_keepalives_count", SERVER_KEEPALIVE_COUNT.into(), ""),
            ("tcp_user_timeout", SERVER_USER_TIMEOUT.as_millis(), "ms"),
            ("idle_session_timeout", idle_session_timeout.as_millis(), "ms"),
        ];
        for (name, value, _) in wanted {
            if let Err(e) = self.client.batch_execute(&format!("SET {name} = {value}")).await {
                if self.client.is_closed() {
                    return Err(StoreError::Unavailable(format!("setting {name} on the partition-lock session: {e}")));
                }
                tracing::warn!(setting = name, error = %e, "PostgreSQL does not take this setting of the partition-lock session");
            }
        }
        let names: Vec<&str> = wanted.iter().map(|(name, _, _)| *name).collect();
        let rows = self
            .client
            .query("SELECT name, setting FROM pg_settings WHERE name = ANY($1)", &[&names])
            .await
            .map_err(|e| StoreError::Unavailable(format!("reading the partition-lock session's settings: {e}")))?;
        let shown: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let in_force = wanted
            .iter()
            .map(|(name, _, unit)| format!("{name}={}{unit}", shown.get(*name).map_or("(unknown)", String::as_str)))
            .collect::<Vec<_>>()
            .join(" ");
        if shown.get("tcp_keepalives_idle").map(String::as_str) == Some("0") {
            tracing::info!(settings = %in_force, "the partition-lock session is over a Unix socket: PostgreSQL's TCP \
                settings do not apply (a process that dies closes it at once)");
        } else if wanted.iter().all(|(name, value, _)| shown.get(*name) == Some(&value.to_string())) {
            tracing::info!(settings = %in_force, gives_up_after = ?SERVER_GIVES_UP_AFTER,
                "PostgreSQL ends the partition-lock session when this processor stops answering");
        } else {
            tracing::warn!(settings = %in_force, "PostgreSQL did not take every setting of the partition-lock session: \
                a vanished processor may keep its partitions until the server's own TCP timeouts");
        }
        Ok(())
    }

    /// Runs `work`, querying the session every `every` meanwhile so PostgreSQL does not count it idle.
    /// A failed ping is left to the next rebalance, which finds the session gone.
    pub(super) async fn kept_busy_during<T>(&self, every: Duration, work: impl Future<Output = T>) -> T {
        let pings = async {
            loop {
                tokio::time::sleep(every).await;
                if self.client.simple_query("SELECT 1").await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            out = work => out,
            () = pings => unreachable!("the pings never end"),
        }
    }

    async fn try_lock(&self, key: i32, sub: i32) -> Result<bool, StoreError> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1::int4, $2::int4)", &[&key, &sub])
            .await
            .map_err(|e| StoreError::Unavailable(format!("taking a partition lock: {e}")))?;
        Ok(row.get(0))
    }

    pub(super) async fn try_own(&self, partition: u32) -> Result<bool, StoreError> {
        self.try_lock(self.partitions_key, partition as i32).await
    }

    pub(super) async fn release(&self, partition: u32) -> Result<(), StoreError> {
        self.client
            .query_one("SELECT pg_advisory_unlock($1::int4, $2::int4)", &[&self.partitions_key, &(partition as i32)])
            .await
            .map_err(|e| StoreError::Unavailable(format!("releasing a partition lock: {e}")))?;
        Ok(())
    }

    /// This processor's share of the stream's `partitions` now: `ceil(partitions / members)` while
    /// following, every partition nobody else holds for a one-shot run. The members are counted in
    /// every case: the query is what tells a processor that its session (and every lock in it) is
    /// gone, and what keeps a working processor's session from looking idle to PostgreSQL.
    pub(super) async fn share(&self, partitions: u32, follow: bool) -> Result<u32, StoreError> {
        let members = self.members().await?.max(1);
        Ok(if follow { partitions.div_ceil(members) } else { partitions })
    }

    /// The order in which this processor tries to take free partitions: all of them, from an offset of
    /// its slot, so that processors joining together try different partitions first.
    pub(super) fn candidates(&self, partitions: u32) -> impl Iterator<Item = u32> {
        let offset = self.slot.unsigned_abs() * 7 % partitions;
        (0..partitions).map(move |k| (offset + k) % partitions)
    }

    /// Processors sharing the stream now (each holds one member lock in this database).
    pub(super) async fn members(&self) -> Result<u32, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::int8::oid
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&i64::from(self.members_key)],
            )
            .await
            .map_err(|e| StoreError::Unavailable(format!("counting the processors: {e}")))?;
        Ok(row.get::<_, i64>(0) as u32)
    }
}
