//! Periodic work that must run once across replicas (partition upkeep,
//! and for the job kinds: snapshot schedules, export sweeps).
//!
//! Each run takes a PostgreSQL session advisory lock with
//! `pg_try_advisory_lock`: the replica that gets it does the work, the
//! others skip that round instead of queueing behind it. The lock lives on
//! the connection, so a replica that dies (even by SIGKILL) releases it with
//! its connection; no lease expiry to tune. PostgreSQL is the one component
//! every replica shares already, so no other coordinator is needed.

use deadpool_postgres::{Client, Object, Pool};
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

/// The advisory lock key of a task within a schema: the first 8 bytes of
/// SHA-256("audit-worker:<schema>:<task>"), so that deployments sharing a
/// database but not a schema do not exclude each other.
pub fn lock_key(schema: &str, task: &str) -> i64 {
    let digest = Sha256::digest(format!("audit-worker:{schema}:{task}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// What became of one attempt to run exclusive work.
#[derive(Debug, PartialEq, Eq)]
pub enum Exclusive<T> {
    /// This replica held the lock and ran the work.
    Ran(T),
    /// Another replica holds the lock; nothing was done.
    Skipped,
}

/// Runs `work` on a pooled connection if this replica wins the advisory
/// lock for `task`, and releases it afterwards. Errors are strings phrased
/// for the log (the caller retries at its next interval).
pub async fn run_exclusive<T>(
    pool: &Pool,
    schema: &str,
    task: &str,
    work: impl for<'c> FnOnce(&'c Client) -> BoxFuture<'c, Result<T, String>>,
) -> Result<Exclusive<T>, String> {
    let key = lock_key(schema, task);
    let client = pool
        .get()
        .await
        .map_err(|e| crate::db::pool_error_cause(&e))?;
    let won: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(|e| crate::db::root_cause(&e))?
        .get(0);
    if !won {
        return Ok(Exclusive::Skipped);
    }
    let result = work(&client).await;
    let released = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    if !released {
        // Never hand a connection that may still hold the lock back to the
        // pool: closing it releases the lock.
        drop(Object::take(client));
    }
    result.map(Exclusive::Ran)
}
