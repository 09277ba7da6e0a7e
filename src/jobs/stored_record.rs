//! Reading stored records (a row of `audit_log` with its salts) for the
//! record digest (leaf v2): the one place that maps columns to
//! [`StoredRecord`], shared by sealing, `verify` and `prove`.

use std::borrow::Cow;

use serde_json::Value;
use tokio_postgres::Row;

use crate::integrity::record::{
    kept_from_json, record_digest_opened, record_object_opened, salts_from_text, Openings,
    StoredRecord,
};

/// The `audit_log a` columns of a stored record, the first 25 of
/// [`RECORD_COLUMNS`] (a macro so that both select lists are one literal).
macro_rules! row_record_columns {
    () => {
        "a.idempotency_key, a.event_id, a.event_time, a.timestamp_raw, \
         a.action, a.status, a.principal_id, a.organization_id, a.target_resource_type, \
         a.target_resource_id, a.outcome_description, a.hash, a.hash_algorithm, a.hash_provided, \
         a.signature, a.signature_algorithm, a.signature_key_id, a.event_version, a.correlation_id, \
         a.data_classification, a.retention_policy, a.session_context, a.details, a.source, \
         a.ingested_at"
    };
}

/// The select list of a stored record: `audit_log` as `a`, joined with
/// [`SALTS_JOIN`]. [`RECORD_COLUMN_COUNT`] columns.
pub const RECORD_COLUMNS: &str = concat!(
    row_record_columns!(),
    ", s.salts::text, e.commitments, e.requests"
);

/// [`RECORD_COLUMNS`] for a read that fetches the salts apart (by id
/// range, see [`crate::jobs::key_windows`]): the same layout, the salts
/// column NULL; `audit_log a` joined with an [`erasures_join_for`] only.
pub const RECORD_COLUMNS_SALTS_APART: &str = concat!(
    row_record_columns!(),
    ", NULL::text, e.commitments, e.requests"
);

/// How many columns [`RECORD_COLUMNS`] selects.
pub const RECORD_COLUMN_COUNT: usize = 28;

/// The erasure record of an `audit_log a` row, joined as `e`, and the
/// same join finding nothing (for a snapshot holding no erasure at all).
macro_rules! erasures_join {
    () => {
        "LEFT JOIN audit_erasures e ON e.audit_id = a.id"
    };
}
macro_rules! no_erasures_join {
    () => {
        "LEFT JOIN (SELECT * FROM audit_erasures WHERE false) e ON e.audit_id = a.id"
    };
}

/// The joins that bring an `audit_log a` row's salts and, once a GDPR
/// erasure replaced some of its personal values, its erasure record.
pub const SALTS_JOIN: &str = concat!(
    "LEFT JOIN audit_salts s ON s.audit_id = a.id ",
    erasures_join!()
);

/// [`SALTS_JOIN`] for a read whose snapshot holds no erasure record at all:
/// the same columns (the erasure's always NULL) without an index probe of
/// `audit_erasures` per row, which costs a 1,000,000-row read about 0.6 to
/// 1.3 CPU-s of the database's time even when that table is empty.
const SALTS_JOIN_NO_ERASURES: &str = concat!(
    "LEFT JOIN audit_salts s ON s.audit_id = a.id ",
    no_erasures_join!()
);

/// The erasure half of [`SALTS_JOIN`] and of [`SALTS_JOIN_NO_ERASURES`].
const ERASURES_JOIN: &str = erasures_join!();
const NO_ERASURES_JOIN: &str = no_erasures_join!();

/// Whether `tx`'s snapshot holds any erasure record. `tx` must be a
/// `REPEATABLE READ` transaction (or hold the snapshot the reads run in),
/// so that no erasure can commit between this check and the reads.
async fn any_erasures(tx: &tokio_postgres::Transaction<'_>) -> Result<bool, tokio_postgres::Error> {
    Ok(tx
        .query_one("SELECT EXISTS (SELECT 1 FROM audit_erasures)", &[])
        .await?
        .get(0))
}

/// The join for a large read of stored records in `tx`'s snapshot:
/// [`SALTS_JOIN`], or its cheaper form when no event has been erased
/// (`tx` as for [`any_erasures`]).
pub async fn salts_join_for(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<&'static str, tokio_postgres::Error> {
    Ok(if any_erasures(tx).await? {
        SALTS_JOIN
    } else {
        SALTS_JOIN_NO_ERASURES
    })
}

/// The join for a large read of [`RECORD_COLUMNS_SALTS_APART`] in `tx`'s
/// snapshot: the erasure records, or none when no event has been erased.
pub async fn erasures_join_for(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<&'static str, tokio_postgres::Error> {
    Ok(if any_erasures(tx).await? {
        ERASURES_JOIN
    } else {
        NO_ERASURES_JOIN
    })
}

/// The salts of a range of row ids (`$1..=$2`) and of listed ones (`$3`):
/// prepare once per connection for [`salts_of_rows`].
pub const SALTS_BY_ID_WINDOW: &str =
    "SELECT audit_id, salts::text FROM audit_salts WHERE audit_id >= $1 AND audit_id <= $2
     UNION ALL
     SELECT audit_id, salts::text FROM audit_salts WHERE audit_id = ANY($3)";

/// The salts rows (`audit_id`, salts as text) of row ids `ids`, read with
/// `statement` ([`SALTS_BY_ID_WINDOW`]) as one range of the primary key
/// plus the stragglers ([`crate::jobs::key_windows::id_window`]): rows
/// read together were mostly stored together, so this walks the index
/// once instead of descending it per row. Look them up with
/// [`SaltsOfRows::get`].
pub async fn salts_of_rows(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    mut ids: Vec<i64>,
) -> Result<SaltsOfRows, tokio_postgres::Error> {
    let window = crate::jobs::key_windows::id_window(&mut ids);
    let (lo, hi) = window.range.unwrap_or((1, 0));
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&lo, &hi, &window.outside];
    let rows = tx.query(statement, &params).await?;
    let at = crate::jobs::key_windows::KeyIndex::new(rows.iter().map(|r| r.get::<_, i64>(0)));
    Ok(SaltsOfRows { rows, at })
}

/// Salts read by [`salts_of_rows`], by row id.
pub struct SaltsOfRows {
    rows: Vec<Row>,
    at: crate::jobs::key_windows::KeyIndex<i64>,
}

impl SaltsOfRows {
    /// The stored salts (JSON text) of row `id`, if it has any.
    pub fn get(&mut self, id: i64) -> Option<&str> {
        let i = self.at.find(&id)?;
        self.rows[i].get(1)
    }
}

/// What opens a stored record's commitments: its salts and, for erased
/// paths, the erasure record (kept commitments and the requests).
#[derive(Debug, Clone, Default)]
pub struct StoredOpenings {
    /// `audit_salts.salts`: the JSON text as stored.
    pub salts: Option<String>,
    pub kept: Option<Value>,
    /// `[{"request", "at", "paths"}]` of the erasures of this row.
    pub erasures: Option<Value>,
}

impl StoredOpenings {
    /// Whether some of the row's personal values were erased.
    pub fn erased(&self) -> bool {
        self.kept.is_some()
    }

    /// The erased paths (empty when none).
    pub fn erased_paths(&self) -> Vec<String> {
        self.kept
            .as_ref()
            .and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// The record whose columns start at `at`, or `None` when the row is
/// missing (a LEFT JOIN found nothing), with its stored salts and erasure
/// record.
pub fn record_from_row(r: &Row, at: usize) -> Option<(StoredRecord<'_>, StoredOpenings)> {
    // Text columns borrow the row (`&str`); `Cow` lets tests and callers
    // that build a record by hand own theirs.
    let text = |i: usize| Cow::Borrowed(r.get::<_, &str>(i));
    let opt_text = |i: usize| r.get::<_, Option<&str>>(i).map(Cow::Borrowed);
    let key: Option<&str> = r.get(at);
    let rec = StoredRecord {
        idempotency_key: Cow::Borrowed(key?),
        event_id: opt_text(at + 1),
        event_time: r.get(at + 2),
        timestamp_raw: text(at + 3),
        action: text(at + 4),
        status: text(at + 5),
        principal_id: opt_text(at + 6),
        organization_id: opt_text(at + 7),
        target_resource_type: opt_text(at + 8),
        target_resource_id: opt_text(at + 9),
        outcome_description: opt_text(at + 10),
        hash: text(at + 11),
        hash_algorithm: text(at + 12),
        hash_provided: r.get(at + 13),
        signature: opt_text(at + 14),
        signature_algorithm: opt_text(at + 15),
        signature_key_id: opt_text(at + 16),
        event_version: opt_text(at + 17),
        correlation_id: opt_text(at + 18),
        data_classification: opt_text(at + 19),
        retention_policy: opt_text(at + 20),
        session_context: r.get(at + 21),
        details: r.get(at + 22),
        source: text(at + 23),
        ingested_at: r.get(at + 24),
    };
    let openings = StoredOpenings {
        salts: r.get(at + 25),
        kept: r.get(at + 26),
        erasures: r.get(at + 27),
    };
    Some((rec, openings))
}

/// The record digest of a stored record, opened by its stored salts and
/// kept commitments; the error says what in the stored data prevents
/// computing it.
pub fn stored_digest(rec: &StoredRecord<'_>, o: &StoredOpenings) -> Result<[u8; 32], String> {
    let salts = salts_from_text(o.salts.as_deref())?;
    let kept = kept_from_json(o.kept.as_ref())?;
    record_digest_opened(
        rec,
        Openings {
            salts: &salts,
            kept: &kept,
        },
    )
}

/// The record object (as a v2 proof prints it) of a stored record.
pub fn stored_object(rec: &StoredRecord<'_>, o: &StoredOpenings) -> Result<Value, String> {
    let salts = salts_from_text(o.salts.as_deref())?;
    let kept = kept_from_json(o.kept.as_ref())?;
    record_object_opened(
        rec,
        Openings {
            salts: &salts,
            kept: &kept,
        },
    )
}
