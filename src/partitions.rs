//! Monthly partitions of `audit_log`: which months must exist, and creating
//! them without ever making inserts wait.
//!
//! Every month an accepted event can fall in (the validation window plus
//! `database.partitions_ahead_months`) is created ahead of time by the
//! background upkeep, so inserts normally meet no DDL at all. A month still
//! missing (right after the first start) is created by the sink, under
//! `database.ddl_lock_timeout_ms`; when that fails only that month's rows
//! wait and are retried, the rest of their batch is stored.
//!
//! Locks: the SQL function `audit_log_ensure_partition` (migration V8)
//! creates a month's table on its own and ATTACHes it, which needs only
//! SHARE UPDATE EXCLUSIVE on `audit_log`. That conflicts neither with what
//! inserts hold (ROW EXCLUSIVE) nor with what snapshot sealing holds (ROW
//! EXCLUSIVE plus row locks on the unsealed rows it numbers) nor with what
//! `verify` and exports hold for their whole read-only transaction (ACCESS
//! SHARE): partition DDL neither waits for them nor, waiting, queues the
//! inserts behind it. (`CREATE TABLE ... PARTITION OF`, used before, takes
//! ACCESS EXCLUSIVE and did both.)

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

/// The months an accepted event can fall in: validation refuses events
/// older than `max_age` or more than `max_future_skew` ahead, and
/// `ahead_months` more are kept ready beyond that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionWindow {
    pub max_age: chrono::Duration,
    pub max_future_skew: chrono::Duration,
    pub ahead_months: u32,
}

impl PartitionWindow {
    /// The window of `[validation]` and `database.partitions_ahead_months`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_age: chrono::Duration::days(config.validation.max_event_age_days),
            max_future_skew: chrono::Duration::seconds(config.validation.max_future_skew_secs),
            ahead_months: config.database.partitions_ahead_months,
        }
    }

    /// First days of the window's months at `now`, newest first (so the
    /// months most events need are made first).
    pub fn months(&self, now: DateTime<Utc>) -> Vec<NaiveDate> {
        let oldest = month_start((now - self.max_age).date_naive());
        let newest_accepted = month_start((now + self.max_future_skew).date_naive());
        let newest =
            add_months(month_start(now.date_naive()), self.ahead_months).max(newest_accepted);
        let mut months = Vec::new();
        let mut m = newest;
        while m >= oldest {
            months.push(m);
            match m.checked_sub_months(chrono::Months::new(1)) {
                Some(prev) => m = prev,
                None => break,
            }
        }
        months
    }
}

/// Months whose partition could not be created, with the reason.
pub type MonthFailures = BTreeMap<NaiveDate, String>;

/// Creates monthly partitions and remembers those known to exist, so a
/// batch pays for partition DDL only the first time it meets a month.
#[derive(Debug)]
pub struct Partitions {
    known: Mutex<HashSet<NaiveDate>>,
    /// `lock_timeout` of the DDL, in milliseconds.
    lock_timeout_ms: i32,
}

impl Partitions {
    /// Partitions whose DDL waits at most `ddl_lock_timeout` for a lock.
    pub fn new(ddl_lock_timeout: Duration) -> Self {
        Self {
            known: Mutex::new(HashSet::new()),
            lock_timeout_ms: i32::try_from(ddl_lock_timeout.as_millis())
                .unwrap_or(i32::MAX)
                .max(1),
        }
    }

    /// Ensures a partition exists for every month in `months` (first
    /// days). A month PostgreSQL refused (lock timeout, statement timeout,
    /// privileges, ...) is returned with the reason and the other months are
    /// still made; an error means the connection itself failed.
    pub async fn ensure(
        &self,
        client: &tokio_postgres::Client,
        months: impl IntoIterator<Item = NaiveDate>,
    ) -> Result<MonthFailures, tokio_postgres::Error> {
        let missing: Vec<NaiveDate> = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            months.into_iter().filter(|m| !known.contains(m)).collect()
        };
        let mut failures = MonthFailures::new();
        for month in missing {
            let result = client
                .execute(
                    "SELECT audit_log_ensure_partition($1, $2)",
                    &[&month, &self.lock_timeout_ms],
                )
                .await;
            match result {
                Ok(_) => {
                    self.known
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(month);
                }
                Err(e) => match e.as_db_error() {
                    Some(db) => {
                        failures.insert(month, describe_failure(db));
                    }
                    None => return Err(e),
                },
            }
        }
        Ok(failures)
    }

    /// Ensures every month of `window` at `now`, newest first.
    pub async fn ensure_window(
        &self,
        client: &tokio_postgres::Client,
        window: &PartitionWindow,
        now: DateTime<Utc>,
    ) -> Result<MonthFailures, tokio_postgres::Error> {
        self.ensure(client, window.months(now)).await
    }

    /// Forgets `months`, so the next batch that needs them checks (and if
    /// need be creates) their partitions again: for a partition dropped by
    /// an operator after this process saw it.
    pub fn forget(&self, months: impl IntoIterator<Item = NaiveDate>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for m in months {
            known.remove(&m);
        }
    }
}

/// Why PostgreSQL refused a month's DDL, with what to do about it.
fn describe_failure(db: &tokio_postgres::error::DbError) -> String {
    use tokio_postgres::error::SqlState;
    let hint = match db.code() {
        c if *c == SqlState::LOCK_NOT_AVAILABLE => {
            ": audit_log is locked by another session (an ANALYZE, a migration, manual DDL); \
             retried later, or raise database.ddl_lock_timeout_ms"
        }
        c if *c == SqlState::UNDEFINED_FUNCTION => {
            ": the schema is older than this worker; run `audit-worker migrate`"
        }
        _ => "",
    };
    format!("{} ({}){hint}", db.message(), db.code().code())
}

/// First day of the month of `d`.
pub fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap_or(d)
}

fn add_months(d: NaiveDate, n: u32) -> NaiveDate {
    d.checked_add_months(chrono::Months::new(n)).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn the_window_covers_every_month_validation_accepts_plus_the_months_ahead() {
        let window = PartitionWindow {
            max_age: chrono::Duration::days(3650),
            max_future_skew: chrono::Duration::days(1),
            ahead_months: 3,
        };
        let now: DateTime<Utc> = "2026-11-29T20:00:00Z".parse().unwrap();
        let months = window.months(now);
        assert_eq!(months.first(), Some(&d("2027-02-01")), "newest first");
        // now - 3650 days = 2016-12-02: its month is the oldest.
        assert_eq!(months.last(), Some(&d("2016-12-01")));
        assert_eq!(months.len(), 123);
        assert!(months.windows(2).all(|w| w[0] > w[1]));
        assert!(months.iter().all(|m| m.day() == 1));
    }

    #[test]
    fn a_future_skew_beyond_the_months_ahead_extends_the_window() {
        let window = PartitionWindow {
            max_age: chrono::Duration::days(1),
            max_future_skew: chrono::Duration::days(1),
            ahead_months: 0,
        };
        // On the last day of a month, tomorrow's month is accepted too.
        let now: DateTime<Utc> = "2026-11-30T23:00:00Z".parse().unwrap();
        assert_eq!(window.months(now), vec![d("2026-12-01"), d("2026-11-01")]);
        let now: DateTime<Utc> = "2026-11-15T12:00:00Z".parse().unwrap();
        assert_eq!(window.months(now), vec![d("2026-11-01")]);
    }
}
