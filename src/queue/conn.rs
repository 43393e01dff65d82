//! How conveyor reaches Redis, as `[redis] mode` says: one server, a Redis
//! Cluster, or the master that a set of Sentinels points to.
//!
//! Everything above this module talks to a [`RedisConn`] (any command, any
//! pipeline, any script) and asks a [`Connector`] for the two connections
//! that cannot be shared: one for blocking `BLMOVE` and one for pub/sub.
//!
//! * **Single**: a [`ConnectionManager`] (multiplexed, reconnects itself).
//! * **Cluster**: redis-rs' cluster connection, which follows `MOVED`/`ASK`
//!   and refreshes its slot map after a failover. Every key of a queue
//!   carries the `{Q}` hash tag, so each script and `BLMOVE` touches one
//!   slot. A pipeline may still mix slots (a cancel flags the job on every
//!   queue, the publisher updates `P:live` and publishes on job channels):
//!   [`RedisConn`] splits such a pipeline into one sub-pipeline per slot,
//!   sent concurrently, and puts the replies back in order (`cluster.rs`,
//!   behind the `cluster` cargo feature). No command that reaches a node
//!   crosses slots. Pub/sub uses a connection of its own to the first seed
//!   that answers: a cluster broadcasts `PUBLISH` to every node, so any
//!   node hears every channel.
//! * **Sentinel**: a connection to the master the Sentinels name
//!   ([`FollowMaster`]); an error that means "this is not (or no longer)
//!   the master" makes it ask the Sentinels again and switch.
//!
//! TLS: `rediss://` URLs, with the `[redis]` CA and client certificate for
//! one server, every cluster node, and both hops of a Sentinel setup (the
//! Sentinels and the master they name).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSub,
};
#[cfg(feature = "cluster")]
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::config::{RedisConfig, RedisMode};

/// A connection for ordinary commands. Cheap to clone; clones share the
/// underlying sockets.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    /// A dedicated connection (blocking commands on one server or master).
    Direct(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(ClusterConnection),
    Sentinel(Arc<FollowMaster>),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Direct(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(f) => Box::pin(f.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => {
                if !pipeline.is_transaction() && offset == 0 && count == pipeline.len() {
                    Box::pin(super::cluster::per_slot(c, pipeline))
                } else {
                    c.req_packed_commands(pipeline, offset, count)
                }
            }
            Self::Sentinel(f) => Box::pin(f.commands(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Direct(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Self::Cluster(_) => 0,
            Self::Sentinel(f) => f.db,
        }
    }
}

impl RedisConn {
    /// Runs `cmd` on every master (one server, the Sentinels' master, or
    /// each master of a cluster); the replies by node address.
    pub async fn on_every_master(&mut self, cmd: &Cmd) -> RedisResult<Vec<(String, Value)>> {
        #[cfg(feature = "cluster")]
        if let Self::Cluster(c) = self {
            return super::cluster::on_every_master(c, cmd).await;
        }
        Ok(vec![(String::new(), self.req_packed_command(cmd).await?)])
    }
}

/// Makes the connections of one `[redis]` setup.
// One per Broker, made once: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Connector {
    Single(redis::Client),
    #[cfg(feature = "cluster")]
    Cluster {
        /// Seed node URLs.
        urls: Vec<String>,
        /// The same, for pub/sub.
        seeds: Vec<redis::Client>,
        /// `[redis]` TLS files, for every node (with `rediss://` seeds).
        certs: Option<redis::TlsCertificates>,
    },
    Sentinel(Arc<FollowMaster>),
}

impl Connector {
    /// The connector for `[redis]` (`url` and the TLS files for one
    /// server, `urls` for the others). A Sentinel setup is asked `retries`
    /// more times (backing off) when it names no master that answers, as
    /// during a failover.
    pub async fn new(redis: &RedisConfig, retries: usize) -> RedisResult<Self> {
        Ok(match redis.mode {
            RedisMode::Standalone => Self::Single(super::open_client(&redis.url, Some(redis))?),
            #[cfg(feature = "cluster")]
            RedisMode::Cluster => {
                let seeds = redis
                    .urls
                    .iter()
                    .map(|u| super::open_client(u, Some(redis)))
                    .collect::<RedisResult<Vec<_>>>()?;
                let certs = match redis.uses_tls() {
                    true => super::tls_certificates(redis)?,
                    false => None,
                };
                Self::Cluster {
                    urls: redis.urls.clone(),
                    seeds,
                    certs,
                }
            }
            RedisMode::Sentinel => {
                Self::Sentinel(Arc::new(FollowMaster::new(redis, retries).await?))
            }
            // The config check refuses it in a build without the feature.
            #[cfg(not(feature = "cluster"))]
            RedisMode::Cluster => {
                return Err(io_error(
                    "mode = \"cluster\" needs conveyor built with the `cluster` feature",
                ));
            }
        })
    }

    /// The shared connection for ordinary commands. On one server,
    /// `retries` connection attempts are made before the first error is
    /// returned (0: report the cause at once, as the command line does).
    pub async fn shared(&self, retries: usize) -> RedisResult<RedisConn> {
        Ok(match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(retries)
                    .set_response_timeout(Some(super::COMMAND_TIMEOUT))
                    .set_connection_timeout(Some(super::CONNECT_TIMEOUT))
                    .set_max_delay(Duration::from_secs(5));
                RedisConn::Single(client.get_connection_manager_with_config(config).await?)
            }
            #[cfg(feature = "cluster")]
            Self::Cluster { urls, certs, .. } => RedisConn::Cluster(
                super::cluster::cluster_client(urls, certs, super::COMMAND_TIMEOUT)?
                    .get_async_connection()
                    .await?,
            ),
            Self::Sentinel(f) => RedisConn::Sentinel(f.clone()),
        })
    }

    /// A new connection of its own, whose replies may take `timeout`.
    pub async fn dedicated(&self, timeout: Duration) -> RedisResult<RedisConn> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(super::CONNECT_TIMEOUT));
        Ok(match self {
            Self::Single(client) => RedisConn::Direct(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ),
            #[cfg(feature = "cluster")]
            Self::Cluster { urls, certs, .. } => RedisConn::Cluster(
                super::cluster::cluster_client(urls, certs, timeout)?
                    .get_async_connection()
                    .await?,
            ),
            Self::Sentinel(f) => RedisConn::Direct(f.master_connection(&config).await?.0),
        })
    }

    /// A connection for SUBSCRIBE / PSUBSCRIBE.
    pub async fn pubsub(&self) -> RedisResult<PubSub> {
        match self {
            Self::Single(client) => client.get_async_pubsub().await,
            #[cfg(feature = "cluster")]
            Self::Cluster { seeds, .. } => {
                let mut last = None;
                for seed in seeds {
                    match seed.get_async_pubsub().await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| io_error("no cluster seed node")))
            }
            Self::Sentinel(f) => f.master_client().await?.get_async_pubsub().await,
        }
    }
}

pub(super) fn io_error(message: &str) -> RedisError {
    RedisError::from(std::io::Error::other(message.to_owned()))
}

/// Refreshes are at most this frequent, however many commands fail at once.
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// A connection to the master that the Sentinels name, switched to the new
/// master after a failover.
///
/// Commands go to the current master's connection. An error saying that
/// the connection is gone, or that the server is now a read-only replica,
/// makes it ask the Sentinels again (at most every [`REFRESH_EVERY`]) and
/// connect to the master they name; the failed command's error is still
/// returned, and callers retry as they do after any Redis error.
pub struct FollowMaster {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: RwLock<Option<Current>>,
    refresh: tokio::sync::Mutex<Option<Instant>>,
    config: AsyncConnectionConfig,
    db: i64,
    /// The Sentinels and master name, passwords redacted, for messages.
    target: String,
}

struct Current {
    generation: u64,
    address: String,
    conn: MultiplexedConnection,
}

impl FollowMaster {
    async fn new(redis: &RedisConfig, retries: usize) -> RedisResult<Self> {
        let sentinel = sentinel_client(redis)?;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(super::COMMAND_TIMEOUT))
            .set_connection_timeout(Some(super::CONNECT_TIMEOUT));
        let this = Self {
            sentinel: tokio::sync::Mutex::new(sentinel),
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
            config,
            db: 0,
            target: redis.target(),
        };
        // 250 ms doubling to 5 s, jittered; `retries` retries, then the error.
        use backon::Retryable as _;
        let steps = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_max_times(retries);
        (|| this.switch(0))
            .retry(steps)
            .notify(|e, _| tracing::warn!(url = %redis.target(), error = %e, "sentinel_no_master"))
            .await?;
        Ok(this)
    }

    /// A client for the master the Sentinels name now.
    async fn master_client(&self) -> RedisResult<redis::Client> {
        self.sentinel.lock().await.async_get_client().await
    }

    /// A new connection to the current master, and its address.
    async fn master_connection(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<(MultiplexedConnection, String)> {
        let client = self.master_client().await?;
        let address = client.get_connection_info().addr().to_string();
        let conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        Ok((conn, address))
    }

    /// The current connection and its generation (0: none yet).
    fn current(&self) -> (u64, Option<MultiplexedConnection>) {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        c.as_ref()
            .map_or((0, None), |c| (c.generation, Some(c.conn.clone())))
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.connection().await?;
        let reply = conn.req_packed_command(cmd).await;
        self.after(generation, &reply).await;
        reply
    }

    async fn commands(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.connection().await?;
        let reply = conn.req_packed_commands(pipeline, offset, count).await;
        self.after(generation, &reply).await;
        reply
    }

    /// The current connection (made in [`FollowMaster::new`], so always there).
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        match self.current() {
            (generation, Some(conn)) => Ok((generation, conn)),
            (_, None) => {
                self.switch(0).await?;
                match self.current() {
                    (generation, Some(conn)) => Ok((generation, conn)),
                    (_, None) => Err(io_error("no connection to the master")),
                }
            }
        }
    }

    async fn after<T>(&self, generation: u64, reply: &RedisResult<T>) {
        if let Err(e) = reply
            && master_may_have_moved(e)
            && let Err(err) = self.switch(generation).await
        {
            tracing::warn!(url = %self.target, error = %err, "sentinel_master_unreachable");
        }
    }

    /// Connects to the master the Sentinels name, unless the connection
    /// was replaced since `seen` or was refreshed very recently.
    ///
    /// After the first connection, a command that fails while another one
    /// is already asking the Sentinels returns at once: failing commands
    /// never queue up behind lookups of a master that is gone.
    async fn switch(&self, seen: u64) -> RedisResult<()> {
        let mut last = if seen == 0 {
            self.refresh.lock().await
        } else {
            match self.refresh.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(()),
            }
        };
        if self.current().0 != seen {
            return Ok(());
        }
        if seen > 0 && last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return Ok(());
        }
        let found = self.master_connection(&self.config).await;
        *last = Some(Instant::now());
        let (conn, address) = found?;
        let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = c.as_ref()
            && old.address != address
        {
            tracing::warn!(from = %old.address, to = %address, "sentinel_master_changed");
        }
        *c = Some(Current {
            generation: seen + 1,
            address,
            conn,
        });
        Ok(())
    }
}

/// The Sentinel client of `[redis]`: the Sentinels' addresses and their
/// credentials from `urls` (the same in every URL: the config checks it),
/// the master's from `master_username` / `master_password`.
///
/// One scheme means both hops: with `rediss://` Sentinels, the master and
/// replicas they name are reached over TLS too, with the same CA and client
/// certificate (Sentinels given `tls-replication yes` announce the TLS
/// ports). Plain `redis://` is plain to both.
fn sentinel_client(redis: &RedisConfig) -> RedisResult<SentinelClient> {
    use redis::IntoConnectionInfo;
    let infos = redis
        .urls
        .iter()
        .map(|u| u.as_str().into_connection_info())
        .collect::<RedisResult<Vec<_>>>()?;
    let name = redis.master.clone().unwrap_or_default();
    let addrs = infos.iter().map(|i| i.addr().clone());
    let mut b = SentinelClientBuilder::new(addrs, name, SentinelServerType::Master)?;
    if let Some(first) = infos.first().map(redis::ConnectionInfo::redis_settings) {
        if let Some(user) = first.username() {
            b = b.set_client_to_sentinel_username(user);
        }
        if let Some(password) = first.password() {
            b = b.set_client_to_sentinel_password(password);
        }
    }
    if let Some(user) = &redis.master_username {
        b = b.set_client_to_redis_username(user);
    }
    if let Some(password) = &redis.master_password {
        b = b.set_client_to_redis_password(password);
    }
    if redis.uses_tls() {
        b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
        if let Some(certs) = super::tls_certificates(redis)? {
            b = b
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
    }
    b.build()
}

/// Whether an error may mean that the master moved: the connection broke
/// or was refused, or the server is now a replica.
fn master_may_have_moved(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
        // A write inside a script on a replica (Redis 6.2: "ERR Error
        // running script ... -READONLY ...").
        || e.to_string().contains("READONLY")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_that_may_mean_a_new_master_switch_connections() {
        use redis::{ErrorKind, ServerErrorKind};
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(master_may_have_moved(&readonly));
        assert!(master_may_have_moved(&io_error("broken pipe")));
        let in_script = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "Error running script",
            "-READONLY You can't write against a read only replica.".to_owned(),
        ));
        assert!(master_may_have_moved(&in_script));
        let wrongtype =
            RedisError::from((ErrorKind::Server(ServerErrorKind::ExecAbort), "EXECABORT"));
        assert!(!master_may_have_moved(&wrongtype));
    }
}
