//! The Redis Streams source: producers `XADD audit:events` (or, sharded,
//! `audit:events:{0}` .. `{N-1}`; see [`crate::shards`]).
//!
//! Each shard has its own reader (a blocking XREADGROUP spans one key's
//! slot only on a cluster) with its own consumer group, dead-letter
//! stream, blocking connection and `max_in_flight_batches`; they share the
//! command connection and the processor. The rest of this comment is one
//! shard's reader.
//!
//! Reads through the consumer group `audit-workers`: first its own pending
//! entries (left by a previous run of this consumer), then new entries
//! with a blocking XREADGROUP on a dedicated connection, and every
//! `claim_interval` the entries that have waited longer than `claim_idle`
//! on any consumer (XAUTOCLAIM: a dead replica's entries). Each read batch
//! is handled in its own task ([`batch`]), up to `max_in_flight_batches` at
//! once, so reading overlaps writing; entries in flight are kept fresh
//! ([`in_flight`]) so that no live consumer's entries are claimed.
//!
//! The path of one entry: [`reply`] parses it, [`batch`] turns it into a
//! delivery for the [`Processor`], and carries out the disposition: the
//! XADD to the DLQ, the XACK and the optional XDEL in one MULTI/EXEC.
//! Nothing is acknowledged that is not a committed row or a dead letter.

pub mod batch;
pub mod bounded_read;
pub mod in_flight;
pub mod reply;

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{Config, RedisConfig, StreamConfig};
use crate::dlq::RejectReason;
use crate::message::{SourceKind, MAX_SIDE_FIELD_BYTES};
use crate::processor::Processor;
use crate::source::{RedisConn, RedisTarget};

use batch::{handle_batch, Arrival};
use bounded_read::{read_bounded, BoundedRead, BoundedReadArgs, BOUNDED_READ_LUA};
use in_flight::{keep_fresh, InFlight, Refresh};
pub use reply::{parse_entries, parse_read_reply, StreamEntry};

/// Everything a batch task needs, shared between tasks.
pub(crate) struct Shared {
    stream: StreamConfig,
    dlq_key: String,
    consumer: String,
    processor: Processor,
    commands: RedisConn,
    /// [`BOUNDED_READ_LUA`], loaded once per connection (EVALSHA).
    bounded_read: redis::Script,
    /// Ids read and not yet acknowledged, refreshed against XAUTOCLAIM.
    in_flight: Arc<InFlight>,
}

/// The stream source: one reader per shard; `run` consumes until shutdown.
pub struct StreamSource {
    shards: Vec<ShardReader>,
}

/// One shard's reader: its keys and its own blocking connection.
struct ShardReader {
    shared: Arc<Shared>,
    target: RedisTarget,
    redis: RedisConfig,
}

impl StreamSource {
    /// Prepares a reader for every shard (no I/O until `run`).
    pub fn new(
        config: &Config,
        target: RedisTarget,
        commands: RedisConn,
        processor: Processor,
    ) -> Self {
        let consumer = config.consumer_name();
        let shards = crate::shards::shard_keys(config)
            .into_iter()
            .map(|keys| ShardReader {
                shared: Arc::new(Shared {
                    stream: StreamConfig {
                        key: keys.stream,
                        ..config.stream.clone()
                    },
                    dlq_key: keys.dlq,
                    consumer: consumer.clone(),
                    processor: processor.clone(),
                    commands: commands.clone(),
                    bounded_read: redis::Script::new(BOUNDED_READ_LUA),
                    in_flight: Arc::default(),
                }),
                target: target.clone(),
                redis: config.redis.clone(),
            })
            .collect();
        Self { shards }
    }

    /// Runs every shard's reader until shutdown, and returns when all have
    /// finished their batches in flight.
    pub async fn run(self) {
        let mut readers = JoinSet::new();
        for shard in self.shards {
            readers.spawn(shard.run());
        }
        while let Some(r) = readers.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a stream shard reader failed");
            }
        }
    }
}

impl ShardReader {
    /// Consumes until shutdown, then waits for the batches in flight to be
    /// written and acknowledged. Redis errors are logged and retried with
    /// backoff; they never end the loop.
    async fn run(self) {
        let s = &self.shared;
        let shutdown = s.processor.shutdown().clone();
        tracing::info!(stream = %s.stream.key, group = %s.stream.group, consumer = %s.consumer, "stream source starting");
        let keepalive_stop = tokio_util::sync::CancellationToken::new();
        let keepalive = tokio::spawn(keep_fresh(
            s.in_flight.clone(),
            s.commands.clone(),
            Refresh {
                stream: s.stream.key.clone(),
                group: s.stream.group.clone(),
                consumer: s.consumer.clone(),
                claim_idle: Duration::from_millis(s.stream.claim_idle_ms),
            },
            s.processor.metrics().clone(),
            keepalive_stop.clone(),
        ));
        let slots = Arc::new(Semaphore::new(s.stream.max_in_flight_batches));
        let mut tasks = JoinSet::new();
        let block = Duration::from_millis(s.stream.block_ms);
        let mut reader: Option<RedisConn> = None;
        let mut failures: u32 = 0;
        let mut group_ready = false;
        // Our own pending entries (a previous run of this consumer died
        // before acknowledging them) come first, from cursor "0".
        let mut own_pending_cursor = Some("0".to_string());
        let mut next_claim = tokio::time::Instant::now();
        let spawn = |tasks: &mut JoinSet<()>, entries: Vec<StreamEntry>, arrival, permit| {
            tasks.spawn(handle_batch(s.clone(), entries, arrival, permit));
        };

        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            if failures > 0 {
                let delay = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            if !group_ready {
                match self.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(e) => {
                        failures += 1;
                        self.redis_error(
                            "xgroup_create",
                            &e,
                            "cannot create consumer group; retrying",
                        );
                        continue;
                    }
                }
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.cancelled() => break,
            };
            // Nothing is read while the circuit breaker is open: entries
            // stay in Redis until the database takes writes again.
            if !s.processor.sink().wait_writable(&shutdown).await {
                break;
            }

            // 1. Own pending entries, page by page, without blocking.
            if let Some(cursor) = own_pending_cursor.clone() {
                match self.read(&cursor).await {
                    Ok(read) if read.is_empty() => own_pending_cursor = None,
                    Ok(read) => {
                        own_pending_cursor = read.last_id().map(str::to_owned);
                        failures = 0;
                        if !read.entries.is_empty() {
                            spawn(&mut tasks, read.entries, Arrival::Redelivered, permit);
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        group_ready = self.read_failed(
                            &e,
                            "xreadgroup",
                            "reading own pending entries failed; retrying",
                        );
                    }
                }
                continue;
            }

            // 2. Entries idle too long on any consumer.
            if tokio::time::Instant::now() >= next_claim {
                next_claim =
                    tokio::time::Instant::now() + Duration::from_millis(s.stream.claim_interval_ms);
                match self.claim_idle().await {
                    Ok(entries) if !entries.is_empty() => {
                        tracing::info!(count = entries.len(), "claimed idle pending entries");
                        spawn(&mut tasks, entries, Arrival::Redelivered, permit);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        group_ready =
                            self.read_failed(&e, "xautoclaim", "XAUTOCLAIM failed; will retry");
                    }
                }
            }

            // 3. New entries: first without blocking, through the bounded
            // read; only when there are none, block on the dedicated
            // connection for the next one (COUNT 1: the one entry the
            // worker may hold before seeing its size), then take what
            // followed it through the bounded read again.
            match self.read(">").await {
                Ok(read) if !read.is_empty() => {
                    failures = 0;
                    if !read.entries.is_empty() {
                        spawn(&mut tasks, read.entries, Arrival::Fresh, permit);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    group_ready =
                        self.read_failed(&e, "xreadgroup", "reading new entries failed; retrying");
                    continue;
                }
            }
            let conn = match reader.as_mut() {
                Some(c) => c,
                None => match self.target.blocking(&self.redis, block).await {
                    Ok(c) => reader.insert(c),
                    Err(e) => {
                        failures += 1;
                        self.redis_error(
                            "connect",
                            &e,
                            "cannot connect to Redis for reading; retrying",
                        );
                        continue;
                    }
                },
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&s.stream.group)
                .arg(&s.consumer)
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(s.stream.block_ms)
                .arg("STREAMS")
                .arg(&s.stream.key)
                .arg(">");
            let reply: redis::RedisResult<Value> = tokio::select! {
                r = cmd.query_async(conn) => r,
                // Entries delivered to a read we abandon here stay pending
                // on this consumer and are read again at the next start.
                _ = shutdown.cancelled() => break,
            };
            match reply {
                Ok(v) => {
                    failures = 0;
                    let mut entries = parse_read_reply(v);
                    if entries.first().is_some_and(|e| self.too_large_to_hold(e)) {
                        // Dead-lettered before anything more is read, so at
                        // most one oversized entry is ever in the worker.
                        handle_batch(s.clone(), entries, Arrival::Fresh, permit).await;
                        continue;
                    }
                    if !entries.is_empty() {
                        // The wake-up entry and whatever arrived behind it
                        // make one batch; a failed follow-up read only
                        // leaves those for the next turn.
                        if let Ok(more) = self.read(">").await {
                            entries.extend(more.entries);
                        }
                        spawn(&mut tasks, entries, Arrival::Fresh, permit);
                    }
                }
                Err(e) => {
                    failures += 1;
                    reader = None;
                    group_ready =
                        self.read_failed(&e, "xreadgroup", "XREADGROUP failed; reconnecting");
                }
            }
        }
        tracing::info!(
            in_flight = tasks.len(),
            "stream source stopping; finishing batches in flight"
        );
        while tasks.join_next().await.is_some() {}
        keepalive_stop.cancel();
        let _ = keepalive.await;
    }

    /// Whether an entry read without the bounded script is over the limits
    /// that script applies (the processor dead-letters it).
    fn too_large_to_hold(&self, entry: &StreamEntry) -> bool {
        let data = entry.field("data").map_or(0, <[u8]>::len);
        data > self.shared.processor.policy().max_event_bytes
            || entry.side_bytes() > MAX_SIDE_FIELD_BYTES
    }

    async fn ensure_group(&self) -> redis::RedisResult<()> {
        let s = &self.shared;
        let mut conn = s.commands.clone();
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&s.stream.key)
            .arg(&s.stream.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// A bounded read from `start`; counts and logs the entries it
    /// dead-lettered inside Redis.
    async fn read(&self, start: &str) -> redis::RedisResult<BoundedRead> {
        let s = &self.shared;
        let args = BoundedReadArgs {
            stream: &s.stream.key,
            dlq: &s.dlq_key,
            group: &s.stream.group,
            consumer: &s.consumer,
            count: s.stream.read_count,
            max_data_bytes: s.processor.policy().max_event_bytes,
            max_side_bytes: MAX_SIDE_FIELD_BYTES,
            delete_acked: s.stream.delete_acked,
        };
        let mut conn = s.commands.clone();
        let read = read_bounded(&s.bounded_read, &mut conn, &args, start).await?;
        if !read.dropped.is_empty() {
            s.processor.dead_lettered_in_redis(
                SourceKind::Stream,
                RejectReason::TooLarge,
                read.dropped.len() as u64,
            );
            for d in &read.dropped {
                tracing::info!(
                    reason = RejectReason::TooLarge.code(),
                    source = %format!("stream:{}:{}", s.stream.key, d.id),
                    data_bytes = d.data_bytes,
                    other_bytes = d.other_bytes,
                    "dead-lettered inside Redis without reading it (entry too large)"
                );
            }
        }
        Ok(read)
    }

    /// Claims entries idle longer than `claim_idle_ms` on any consumer.
    /// Pending ids whose entries were deleted meanwhile are dropped from
    /// the pending list by Redis itself; they are counted and logged here.
    async fn claim_idle(&self) -> redis::RedisResult<Vec<StreamEntry>> {
        let s = &self.shared;
        let mut conn = s.commands.clone();
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(&s.stream.key)
            .arg(&s.stream.group)
            .arg(&s.consumer)
            .arg(s.stream.claim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(s.stream.read_count)
            .query_async(&mut conn)
            .await?;
        let claimed = reply::parse_autoclaim_reply(v);
        if !claimed.deleted.is_empty() {
            s.processor
                .metrics()
                .stream_trimmed
                .inc_by(claimed.deleted.len() as u64);
            tracing::warn!(
                count = claimed.deleted.len(),
                ids = ?claimed.deleted,
                stream = %s.stream.key,
                "pending entries were deleted or trimmed from the stream before they were stored (MAXLEN/XTRIM/XDEL by a producer?)"
            );
        }
        Ok(claimed.entries)
    }

    /// Counts and logs a failed Redis operation (`op` labels the metric).
    fn redis_error(&self, op: &str, e: &redis::RedisError, what: &str) {
        self.shared
            .processor
            .metrics()
            .redis_errors
            .with_label_values(&[op])
            .inc();
        tracing::warn!(error = %e, "{what}");
    }

    /// Counts and logs a failed read and says whether the consumer group is
    /// still there (false: recreate it before reading).
    fn read_failed(&self, e: &redis::RedisError, op: &str, what: &str) -> bool {
        self.redis_error(op, e, what);
        !is_nogroup(e)
    }
}

fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}
