//! The Redis side of a queue: fetch, ack, requeue, dead-letter, recover.
//!
//! Life of a job in Redis (contract keys, `P:{Q}:` omitted):
//!
//! ```text
//!  producer LPUSH ─► pending ──BLMOVE/LMOVE──► active:<worker> ──LREM (ack)──► gone
//!                      ▲                           │
//!                      ├──── requeue (RPUSH) ◄─────┤ shutdown, recovery
//!   scheduled ─promote─┘                           │
//!       ▲                                          │
//!       └────────── retry (ZADD, Redis TIME) ◄─────┤ retryable failure
//!                                   dead ◄─────────┘ failure, poison (LPUSH)
//! ```
//!
//! Each delivery is fenced: [`Broker::claim`] records a token in
//! `P:{Q}:leases`, and every [`Broker::settle`] checks it. Recovery drops
//! the lease, so a daemon that was only slow can no longer ack, requeue or
//! dead-letter a job that was handed to another one.
//!
//! A job is always in exactly one list, so a crash at any point loses
//! nothing: whatever sits in a dead daemon's active list is put back.
//! Delivery is at-least-once; completion is deduplicated through SQLite.
//!
//! Connections: ordinary commands go through one [`ConnectionManager`]
//! (multiplexed, so concurrent jobs' commands share one socket and are
//! pipelined; it reconnects by itself). Blocking `BLMOVE` gets a dedicated
//! connection from [`Broker::blocking_connection`]: on a shared socket it
//! would stall every other command for the whole block.
//!
//! This file owns the [`Broker`] handle and its connections;
//! `delivery.rs` has what the daemon uses, `ops.rs` what clients and operators
//! use.

pub mod batch;
#[cfg(feature = "cluster")]
mod cluster;
pub mod conn;
mod delivery;
pub mod inspect;
pub mod keys;
mod ops;
pub mod pools;
pub mod scripts;
mod wait;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::RedisResult;

pub use conn::{Connector, RedisConn};
use delivery::claim_from_code;
pub(crate) use delivery::settle_args;
pub use delivery::{Claim, Fetched, Next, QueuePlan};
pub use keys::Keys;
pub use ops::{Enqueued, LiveEntry, When};
pub use wait::ConnectError;

/// Response timeout of ordinary commands. redis-rs defaults to 500 ms, which
/// turns a slow-but-alive Redis (a big AOF rewrite, a busy script) into
/// ambiguous errors; a few seconds rides that out.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Handle on one Redis for one key prefix. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    connector: Connector,
    conn: RedisConn,
    keys: Keys,
    /// What it connects to, passwords redacted, for messages.
    target: Arc<str>,
    /// Round trips made through this handle (and its clones): what a job
    /// costs in Redis latency, reported at shutdown and by `conveyor bench`.
    round_trips: Arc<AtomicU64>,
}

impl Broker {
    /// Connects (failing fast when Redis is not reachable, so a bad URL or
    /// password stops the start with a clear error).
    pub async fn connect(url: &str, prefix: &str) -> RedisResult<Self> {
        Self::connect_with_retries(url, prefix, 6).await
    }

    /// [`Broker::connect`] with `retries` connection attempts before the
    /// first error is returned (the command line uses 0: it reports the
    /// real cause at once instead of waiting).
    pub async fn connect_with_retries(
        url: &str,
        prefix: &str,
        retries: usize,
    ) -> RedisResult<Self> {
        let client = open_client(url, None)?;
        let target = crate::config::redact_url(url);
        Self::with_connector(Connector::Single(client), prefix, retries, target).await
    }

    /// [`Broker::connect_with_retries`] as `[redis]` says: mode, URLs,
    /// prefix and TLS files.
    pub async fn connect_config(
        redis: &crate::config::RedisConfig,
        retries: usize,
    ) -> RedisResult<Self> {
        let connector = Connector::new(redis, retries).await?;
        Self::with_connector(connector, &redis.prefix, retries, redis.target()).await
    }

    async fn with_connector(
        connector: Connector,
        prefix: &str,
        retries: usize,
        target: String,
    ) -> RedisResult<Self> {
        let conn = connector.shared(retries).await?;
        Ok(Self {
            connector,
            conn,
            keys: Keys::new(prefix),
            target: target.into(),
            round_trips: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Round trips made so far by this handle and its clones.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The shared counter, for components with their own connection use.
    pub fn round_trip_counter(&self) -> Arc<AtomicU64> {
        self.round_trips.clone()
    }

    fn trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// What this handle connects to, passwords redacted (`redis://u:***@h:p`,
    /// or the cluster's seeds, or the Sentinels and master name): for
    /// messages about connection errors.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A clone of the shared command connection.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// A new dedicated connection for blocking commands, whose response
    /// timeout exceeds the server-side block (redis-rs' 500 ms default would
    /// abandon a BLMOVE that the server still completes: a job moved into
    /// the active list with nobody told).
    pub async fn blocking_connection(&self, block: Duration) -> RedisResult<RedisConn> {
        self.connector.dedicated(block + COMMAND_TIMEOUT).await
    }

    /// A connection for SUBSCRIBE / PSUBSCRIBE.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        self.connector.pubsub().await
    }

    /// A new fencing token for a delivery to `worker`. The worker id prefix
    /// lets recovery tell the leases of a list's owner from others'.
    pub fn new_token(worker: &str) -> String {
        format!("{worker}/{}", quick_uuid_v7())
    }
}

/// A Redis client for `url`; for `rediss://`, with the CA and client
/// certificate files of `[redis]` when given (else the system's roots).
pub fn open_client(
    url: &str,
    tls: Option<&crate::config::RedisConfig>,
) -> RedisResult<redis::Client> {
    if !url.starts_with("rediss://") {
        return redis::Client::open(url);
    }
    install_crypto();
    match tls.map(tls_certificates).transpose()?.flatten() {
        Some(certs) => redis::Client::build_with_tls(url, certs),
        None => redis::Client::open(url),
    }
}

/// The CA and client certificate of `[redis]` (`tls_ca_file`,
/// `tls_cert_file`, `tls_key_file`) for a TLS connection; `None` when none
/// is set (the system's trust store is used).
pub(crate) fn tls_certificates(
    cfg: &crate::config::RedisConfig,
) -> RedisResult<Option<redis::TlsCertificates>> {
    install_crypto();
    if cfg.tls_ca_file.is_none() && cfg.tls_cert_file.is_none() {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from(std::io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            ))
        })
    };
    let root_cert = cfg.tls_ca_file.as_deref().map(read).transpose()?;
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// rustls needs a process-wide crypto provider before any TLS connection;
/// installing it twice is harmless (the second call is refused).
fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A UUIDv7 (time-ordered to the millisecond) whose random bits come from
/// `fastrand`. `Uuid::now_v7` reads the OS RNG (a `getrandom` syscall) on
/// every call, which showed up at ~1 % of daemon CPU on the per-job path.
/// Fencing tokens and generated job ids need uniqueness, not secrecy.
pub fn quick_uuid_v7() -> uuid::Uuid {
    let millis = crate::time::now_ms();
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_uuid_v7_is_v7_unique_and_time_ordered() {
        let a = quick_uuid_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = quick_uuid_v7();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert!(a < b, "{a} then {b}");
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| quick_uuid_v7()).collect();
        assert_eq!(many.len(), 10_000);
    }
}
