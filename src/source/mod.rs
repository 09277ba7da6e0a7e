//! Sources read Redis deliveries, hand each to the
//! [`crate::processor::Processor`] as a [`crate::message::Delivery`], and
//! carry out its disposition: they acknowledge only once the outcome is
//! durable (a committed row, or a dead letter written atomically with the
//! acknowledgement).

pub mod bullmq;
pub mod connection;
pub mod stream;

pub use connection::{RedisConn, RedisTarget};

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};

use crate::config::RedisConfig;

/// A Redis problem phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("redis.url is not a valid Redis URL ({0}): use redis://host:port")]
    BadUrl(String),
    #[error("redis.tls_ca_file: {0}: give a readable PEM file with the CA certificate")]
    TlsCa(String),
    #[error(
        "redis unreachable at {target} ({cause}): start Redis or set AUDIT_WORKER__REDIS__URL"
    )]
    Unreachable { target: String, cause: String },
}

/// Opens the Redis client for the configured URL (no I/O yet): plain, or
/// TLS (`rediss://`, rustls) trusting the system roots or `tls_ca_file`.
pub fn redis_client(config: &RedisConfig) -> Result<Client, RedisSetupError> {
    if config.tls_ca_file.is_empty() {
        return Client::open(config.url.expose())
            .map_err(|e| RedisSetupError::BadUrl(e.to_string()));
    }
    let ca = std::fs::read(&config.tls_ca_file)
        .map_err(|e| RedisSetupError::TlsCa(format!("cannot read {} ({e})", config.tls_ca_file)))?;
    Client::build_with_tls(
        config.url.expose(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        },
    )
    .map_err(|e| RedisSetupError::TlsCa(e.to_string()))
}

/// `host:port` of Redis, for messages (never credentials).
pub fn describe_target(client: &Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// The shared command connection to one server: reconnects by itself
/// after a drop (the first command after a drop still fails, so callers
/// retry idempotent commands). [`RedisTarget::connect`] opens it for
/// every deployment.
pub async fn command_connection(
    client: &Client,
    config: &RedisConfig,
) -> Result<RedisConn, RedisSetupError> {
    connection::manager(client, config, connection::Reconnect::Patiently)
        .await
        .map(RedisConn::Single)
        .map_err(|e| RedisSetupError::Unreachable {
            target: describe_target(client),
            cause: e.to_string(),
        })
}

/// A dedicated connection for blocking reads. A `BLOCK` holds up every
/// other command on a multiplexed connection, and its reply may take the
/// whole block time, so it gets its own connection with a response timeout
/// longer than the block.
pub async fn blocking_connection(
    client: &Client,
    config: &RedisConfig,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(config.connect_timeout_secs)))
        .set_response_timeout(Some(
            block + Duration::from_secs(config.response_timeout_secs),
        ));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}
