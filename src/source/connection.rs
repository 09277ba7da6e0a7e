//! How the worker reaches Redis: one server, the master a set of Sentinels
//! names, or a Redis Cluster.
//!
//! [`RedisTarget`] knows where Redis is and opens connections; [`RedisConn`]
//! is the one connection type the rest of the worker sends commands
//! through, whatever the deployment. Both are cheap to clone.
//!
//! Sentinel: the master is looked up with redis-rs's `SentinelClient`
//! (which also checks, with `ROLE`, that the node it names is a master).
//! A command that fails the way a dead or demoted master fails (connection
//! refused or dropped, time-out, `READONLY`) makes the connection ask the
//! sentinels again and, once they name a reachable master, switch every
//! clone to it. The failed command itself returns its error: callers
//! already retry, and only they know whether a command is safe to repeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, Value,
};

use super::RedisSetupError;
use crate::config::redis::parse_host_port;
use crate::config::{RedisConfig, RedisTopology};

/// Where Redis is, and how to open connections to it. The clients are
/// boxed: they are hundreds of bytes, the Sentinel variant a pointer.
#[derive(Clone)]
pub enum RedisTarget {
    /// One server (`redis.url`).
    Single(Box<Client>),
    /// The master the sentinels name (`redis.sentinels`).
    Sentinel(Arc<SentinelMaster>),
    /// A Redis Cluster (`redis.cluster_nodes`).
    Cluster(Box<ClusterClient>),
}

/// A connection to Redis of any deployment; implements
/// [`ConnectionLike`], so commands, pipelines and scripts run on it as on
/// any redis-rs connection.
#[derive(Clone)]
pub enum RedisConn {
    /// The shared, self-reconnecting connection to one server.
    Single(ConnectionManager),
    /// A dedicated connection (blocking reads) to one server or master.
    Dedicated(MultiplexedConnection),
    /// A cluster connection: routes each command by its key's slot and
    /// follows MOVED/ASK redirections.
    Cluster(ClusterConnection),
    /// The shared connection to the master the sentinels name.
    Sentinel(Arc<SentinelMaster>),
}

/// The current master of a Sentinel-monitored deployment: the sentinel
/// client that finds it and the shared connection to it.
pub struct SentinelMaster {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    config: RedisConfig,
    /// The master's connection, with a generation number that tells a
    /// failed command whether someone switched masters since it started.
    current: Mutex<(u64, ConnectionManager, String)>,
}

impl RedisTarget {
    /// Connects as `config` says: finds the master through the sentinels,
    /// or the cluster through its seed nodes, or opens `redis.url`; then a
    /// PING on a fresh connection, so an outage shows here rather than in
    /// the first command. Returns the target and the shared command
    /// connection.
    pub async fn connect(config: &RedisConfig) -> Result<(Self, RedisConn), RedisSetupError> {
        match config.topology() {
            RedisTopology::Single => {
                let client = super::redis_client(config)?;
                probe(&client, config).await?;
                let conn = super::command_connection(&client, config).await?;
                Ok((Self::Single(Box::new(client)), conn))
            }
            RedisTopology::Sentinel => {
                let unreachable = |cause: String| RedisSetupError::Unreachable {
                    target: format!(
                        "the master {:?} of sentinels {}",
                        config.master_name,
                        config.sentinels.join(",")
                    ),
                    cause,
                };
                let mut sentinel = sentinel_client(config)?;
                let client = sentinel
                    .async_get_client()
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let manager = manager(&client, config, Reconnect::Briefly)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let address = super::describe_target(&client);
                tracing::info!(master = %address, name = %config.master_name, "Redis master found through Sentinel");
                let master = Arc::new(SentinelMaster {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    config: config.clone(),
                    current: Mutex::new((0, manager, address)),
                });
                Ok((Self::Sentinel(master.clone()), RedisConn::Sentinel(master)))
            }
            RedisTopology::Cluster => {
                let client = cluster_client(config, Duration::ZERO)
                    .map_err(|e| RedisSetupError::BadUrl(e.to_string()))?;
                let unreachable = |e: RedisError| RedisSetupError::Unreachable {
                    target: format!("cluster {}", config.cluster_nodes.join(",")),
                    cause: e.to_string(),
                };
                let mut conn = client.get_async_connection().await.map_err(unreachable)?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(unreachable)?;
                Ok((Self::Cluster(Box::new(client)), RedisConn::Cluster(conn)))
            }
        }
    }

    /// A dedicated connection for blocking reads. A `BLOCK` holds up every
    /// other command on a multiplexed connection, and its reply may take
    /// the whole block time, so it gets its own connection with a response
    /// timeout longer than the block. Through Sentinel it goes to the
    /// master the sentinels name now; on a cluster it is a cluster
    /// connection of its own.
    pub async fn blocking(&self, config: &RedisConfig, block: Duration) -> RedisResult<RedisConn> {
        match self {
            Self::Single(client) => Ok(RedisConn::Dedicated(
                super::blocking_connection(client, config, block).await?,
            )),
            Self::Sentinel(master) => {
                let client = master.sentinel.lock().await.async_get_client().await?;
                Ok(RedisConn::Dedicated(
                    super::blocking_connection(&client, config, block).await?,
                ))
            }
            Self::Cluster(_) => {
                let client = cluster_client(config, block)?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

impl SentinelMaster {
    /// The current master's connection and its generation.
    fn current(&self) -> (u64, ConnectionManager) {
        let c = self.current.lock().expect("sentinel state lock");
        (c.0, c.1.clone())
    }

    /// Asks the sentinels for the master again after a command failed on
    /// generation `seen`, and switches to it. Does nothing when another
    /// task switched already; logs and keeps the old connection when the
    /// sentinels name no reachable master yet (the next failure asks again).
    async fn refresh(&self, seen: u64) {
        let mut sentinel = self.sentinel.lock().await;
        if self.current().0 != seen {
            return;
        }
        let client = match sentinel.async_get_client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, name = %self.config.master_name, "the sentinels name no reachable master yet; will ask again");
                return;
            }
        };
        match manager(&client, &self.config, Reconnect::Briefly).await {
            Ok(conn) => {
                let address = super::describe_target(&client);
                let mut c = self.current.lock().expect("sentinel state lock");
                if c.2 != address {
                    tracing::warn!(old = %c.2, new = %address, name = %self.config.master_name, "Redis master changed (Sentinel failover): commands go to the new master");
                }
                *c = (seen + 1, conn, address);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to the master the sentinels name; will ask again")
            }
        }
    }
}

/// Whether an error is how a dead, unreachable or demoted master answers.
fn suggests_failover(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.code() == Some("READONLY")
        || e.code() == Some("MASTERDOWN")
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Dedicated(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(master) => Box::pin(async move {
                let (generation, mut conn) = master.current();
                let reply = conn.req_packed_command(cmd).await;
                if let Err(e) = &reply {
                    if suggests_failover(e) {
                        master.refresh(generation).await;
                    }
                }
                reply
            }),
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
            Self::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(master) => Box::pin(async move {
                let (generation, mut conn) = master.current();
                let reply = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &reply {
                    if suggests_failover(e) {
                        master.refresh(generation).await;
                    }
                }
                reply
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Dedicated(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(master) => master.current().1.get_db(),
        }
    }
}

/// One PING on a fresh connection with short timeouts: the connection
/// manager would keep retrying by itself, hiding an outage.
async fn probe(client: &Client, config: &RedisConfig) -> Result<(), RedisSetupError> {
    let timeout = Duration::from_secs(config.connect_timeout_secs.max(1));
    let unreachable = |cause: String| RedisSetupError::Unreachable {
        target: super::describe_target(client),
        cause,
    };
    let probe = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&probe)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(())
}

/// How hard a connection manager tries to reconnect before a command
/// sees the error.
#[derive(Clone, Copy)]
pub(super) enum Reconnect {
    /// One server: keep trying (six attempts, up to 5 s apart); it is the
    /// only place Redis can come back.
    Patiently,
    /// A master named by Sentinel: give up quickly, so that the failure
    /// reaches [`SentinelMaster::refresh`] and the worker asks the
    /// sentinels for the promoted replica instead of waiting on the dead
    /// master.
    Briefly,
}

/// The self-reconnecting shared connection to one server.
pub(super) async fn manager(
    client: &Client,
    config: &RedisConfig,
    reconnect: Reconnect,
) -> RedisResult<ConnectionManager> {
    let (retries, max_delay) = match reconnect {
        Reconnect::Patiently => (6, Duration::from_secs(5)),
        Reconnect::Briefly => (1, Duration::from_millis(200)),
    };
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(config.connect_timeout_secs)))
        .set_response_timeout(Some(Duration::from_secs(config.response_timeout_secs)))
        .set_number_of_retries(retries)
        .set_max_delay(max_delay);
    client.get_connection_manager_with_config(cfg).await
}

/// The sentinel client for `redis.sentinels` / `redis.master_name`, with
/// the user, password and database of `redis.url` for the master.
fn sentinel_client(config: &RedisConfig) -> Result<SentinelClient, RedisSetupError> {
    let url = url_settings(config)?;
    let addrs = config
        .sentinels
        .iter()
        .filter_map(|s| parse_host_port(s))
        .map(|(host, port)| ConnectionAddr::Tcp(host, port));
    let mut builder =
        SentinelClientBuilder::new(addrs, &config.master_name, SentinelServerType::Master)
            .map_err(|e| RedisSetupError::BadUrl(e.to_string()))?
            .set_client_to_redis_db(url.db());
    if let Some(user) = url.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = url.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    builder
        .build()
        .map_err(|e| RedisSetupError::BadUrl(e.to_string()))
}

/// The cluster client for `redis.cluster_nodes`, with the user and
/// password of `redis.url`; `block` is added to the response timeout (a
/// connection for blocking reads).
fn cluster_client(config: &RedisConfig, block: Duration) -> RedisResult<ClusterClient> {
    let url = config.url.expose().into_connection_info()?;
    let url = url.redis_settings();
    let nodes: Vec<String> = config
        .cluster_nodes
        .iter()
        .map(|n| format!("redis://{n}"))
        .collect();
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(Duration::from_secs(config.connect_timeout_secs))
        .response_timeout(block + Duration::from_secs(config.response_timeout_secs));
    if let Some(user) = url.username() {
        builder = builder.username(user);
    }
    if let Some(password) = url.password() {
        builder = builder.password(password);
    }
    builder.build()
}

/// The user, password and database `redis.url` carries.
fn url_settings(config: &RedisConfig) -> Result<redis::RedisConnectionInfo, RedisSetupError> {
    Ok(config
        .url
        .expose()
        .into_connection_info()
        .map_err(|e| RedisSetupError::BadUrl(e.to_string()))?
        .redis_settings()
        .clone())
}
