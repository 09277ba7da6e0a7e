//! Entries this consumer holds (read, not yet acknowledged), kept fresh so
//! that no other consumer claims them.
//!
//! Other replicas (and this one) claim entries idle longer than
//! `stream.claim_idle_ms` with XAUTOCLAIM, which is how a dead replica's
//! entries are recovered. But an entry is also idle, as Redis sees it,
//! while its live holder waits for the database: without a refresh it
//! would be claimed, delivered again (raising its delivery count) and, in
//! a long outage, reach `max_deliveries` although the event was never the
//! problem. So every `claim_idle_ms / 3` the holder re-claims its own
//! in-flight ids with `XCLAIM ... 0 ... JUSTID`, which resets their idle
//! time and, with JUSTID, does not raise their delivery count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::source::RedisConn;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// The ids in flight on this consumer, by read batch: a batch registers
/// its id list once and releases it once, so the hot path pays nothing per
/// entry.
#[derive(Default)]
pub struct InFlight {
    batches: Mutex<HashMap<u64, Arc<[String]>>>,
    next: AtomicU64,
}

/// A batch's registration; [`InFlight::release`] takes it back.
pub struct Held(u64);

impl InFlight {
    /// Marks a batch's ids as held (when they are read).
    pub fn hold(&self, ids: Arc<[String]>) -> Held {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.batches
            .lock()
            .expect("in-flight set poisoned")
            .insert(n, ids);
        Held(n)
    }

    /// Forgets a batch's ids (acknowledged, or left for redelivery).
    pub fn release(&self, held: Held) {
        self.batches
            .lock()
            .expect("in-flight set poisoned")
            .remove(&held.0);
    }

    /// The ids held now.
    pub fn snapshot(&self) -> Vec<String> {
        let batches = self.batches.lock().expect("in-flight set poisoned");
        batches
            .values()
            .flat_map(|ids| ids.iter().cloned())
            .collect()
    }
}

/// Where the refresh goes.
pub struct Refresh {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    /// `stream.claim_idle_ms`: refreshed three times within it.
    pub claim_idle: Duration,
}

/// Ids per XCLAIM call.
const CHUNK: usize = 1000;

/// Refreshes the held ids until `stop` fires (after the last batch has
/// finished: batches still finishing after shutdown must not be claimed).
pub async fn keep_fresh(
    in_flight: Arc<InFlight>,
    mut conn: RedisConn,
    refresh: Refresh,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let every = (refresh.claim_idle / 3).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let ids = in_flight.snapshot();
        for chunk in ids.chunks(CHUNK) {
            let r: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                .arg(&refresh.stream)
                .arg(&refresh.group)
                .arg(&refresh.consumer)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                metrics.redis_errors.with_label_values(&["xclaim"]).inc();
                tracing::debug!(error = %e, "refreshing in-flight entries failed; retrying at the next interval");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ids_are_listed_until_their_batch_is_released() {
        let f = InFlight::default();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Arc<[String]>>();
        let a = f.hold(ids(&["1-0", "2-0"]));
        let _b = f.hold(ids(&["3-0"]));
        f.release(a);
        assert_eq!(f.snapshot(), vec!["3-0".to_string()]);
    }
}
