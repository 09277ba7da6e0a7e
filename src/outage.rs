//! Logging an outage once per state change rather than once per retry.
//!
//! Loops that retry a dependency every second or so (start-up, the export
//! and snapshot executors) would otherwise write the same warning every
//! round for as long as PostgreSQL or Redis is down, drowning everything
//! else. [`OutageLog`] warns when an operation starts failing, counts the
//! failed attempts quietly, and logs once more, with the count, when it
//! succeeds again.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// A change of state worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageChange {
    /// The first failure after success (or since start).
    Began,
    /// The first success after failures.
    Ended {
        /// Failed attempts during the outage.
        failed_attempts: u64,
        /// From the first failure to this success.
        lasted: Duration,
    },
}

/// Tracks one retried operation (e.g. "cannot claim export jobs") and
/// tells when a log line is due. The bookkeeping ([`OutageLog::record_failure`],
/// [`OutageLog::record_success`]) is pure; [`OutageLog::failed`] and
/// [`OutageLog::recovered`] also write the line.
#[derive(Debug, Clone)]
pub struct OutageLog {
    what: &'static str,
    failures: u64,
    since: Option<Instant>,
}

impl OutageLog {
    /// `what` names the failing operation in the log, e.g. "cannot claim
    /// export jobs".
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            failures: 0,
            since: None,
        }
    }

    /// Failed attempts in the current outage (0 when none is under way).
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Whether the operation is failing now.
    pub fn is_down(&self) -> bool {
        self.failures > 0
    }

    /// Counts a failed attempt at `now`; `Some(Began)` on the first one.
    pub fn record_failure(&mut self, now: Instant) -> Option<OutageChange> {
        self.failures += 1;
        if self.failures == 1 {
            self.since = Some(now);
            Some(OutageChange::Began)
        } else {
            None
        }
    }

    /// Counts a success at `now`; `Some(Ended)` when it ends an outage.
    pub fn record_success(&mut self, now: Instant) -> Option<OutageChange> {
        if self.failures == 0 {
            return None;
        }
        let change = OutageChange::Ended {
            failed_attempts: self.failures,
            lasted: self
                .since
                .map(|s| now.saturating_duration_since(s))
                .unwrap_or_default(),
        };
        self.failures = 0;
        self.since = None;
        Some(change)
    }

    /// Counts a failure and warns when it starts an outage; later failures
    /// of the same outage are only counted.
    pub fn failed(&mut self, error: &dyn Display) {
        if self.record_failure(Instant::now()).is_some() {
            tracing::warn!(
                error = %error,
                "{}: {error}; will retry (further failures are counted and reported when it recovers)",
                self.what
            );
        }
    }

    /// Counts a success and, when it ends an outage, logs how long it
    /// lasted and how many attempts failed.
    pub fn recovered(&mut self) {
        if let Some(OutageChange::Ended {
            failed_attempts,
            lasted,
        }) = self.record_success(Instant::now())
        {
            tracing::info!(
                failed_attempts,
                outage_secs = lasted.as_secs(),
                "recovered after {failed_attempts} failed attempt(s) over {}s (was: {})",
                lasted.as_secs(),
                self.what
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_when_it_begins_and_when_it_ends_with_its_count() {
        let mut log = OutageLog::new("cannot claim export jobs");
        let t0 = Instant::now();
        assert_eq!(log.record_success(t0), None, "no outage, nothing to say");
        assert_eq!(log.record_failure(t0), Some(OutageChange::Began));
        for i in 1..=4 {
            assert_eq!(log.record_failure(t0 + Duration::from_secs(i)), None);
        }
        assert!(log.is_down());
        assert_eq!(log.failures(), 5);
        assert_eq!(
            log.record_success(t0 + Duration::from_secs(7)),
            Some(OutageChange::Ended {
                failed_attempts: 5,
                lasted: Duration::from_secs(7)
            })
        );
        assert!(!log.is_down());
        assert_eq!(log.record_success(t0 + Duration::from_secs(8)), None);
        // A new outage is a new state change.
        assert_eq!(
            log.record_failure(t0 + Duration::from_secs(9)),
            Some(OutageChange::Began)
        );
    }
}
