//! `verify` and `prove`: checking the sealed log against its signed
//! checkpoints, and producing inclusion proofs an auditor can check offline.
//!
//! Trust comes only from the verifier key: tree sizes and roots are taken
//! from the signed notes (RFC 6962 proofs do not bind the tree size), never
//! from unsigned columns. Everything streams in leaf order, so memory stays
//! flat for any log size.
//!
//! The check is one REPEATABLE READ, read-only transaction, which holds
//! ACCESS SHARE on `audit_log` (and each partition it reads) until it ends,
//! however long that is. Inserts (ROW EXCLUSIVE) and partition DDL (ATTACH,
//! SHARE UPDATE EXCLUSIVE; see [`crate::partitions`]) do not conflict with
//! it, so a long `verify` never holds up ingestion.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Row, Statement, Transaction};

use crate::integrity::checkpoint::{open_note, Checkpoint, NoteVerifier};
use crate::integrity::merkle::{self, Hash, TreeBuilder};
use crate::integrity::record::{
    digest_of_object, hex32, timestamp_text, LEAF_VERSION_V1, LEAF_VERSION_V2,
};
use crate::integrity::{canonical_hash_v1, HashedFields};
use crate::jobs::key_windows::{self, KeyIndex};
use crate::jobs::merkle_stream::{hash_from_bytes, PagedRows, RangeHasher};
use crate::jobs::snapshot::SnapshotError;
use crate::jobs::stored_record::{
    erasures_join_for, record_from_row, salts_of_rows, stored_digest, stored_object,
    RECORD_COLUMNS, RECORD_COLUMNS_SALTS_APART, SALTS_BY_ID_WINDOW, SALTS_JOIN,
};
use crate::jobs::unsealed::{check_reads, ArrivalsMark, SealedRanges, UnsealedRead};

/// What kind of problem a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    /// A sealed row whose fields, hash or identity changed.
    Altered,
    /// A sealed event whose row is gone (named from the seal ledger).
    Deleted,
    /// A row that the signed log does not contain but that claims to be in
    /// it, or an unsealed row inside a sealed range.
    Inserted,
    /// A checkpoint, ledger or chain problem (bad signature, root or
    /// consistency mismatch).
    Checkpoint,
}

/// One problem `verify` found, naming the event where there is one.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub kind: FindingKind,
    /// The event's idempotency key (its eventId when the producer gave one).
    pub event: Option<String>,
    pub row_id: Option<i64>,
    pub event_time: Option<DateTime<Utc>>,
    pub leaf_index: Option<i64>,
    pub snapshot_id: Option<i64>,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            FindingKind::Altered => "ALTERED",
            FindingKind::Deleted => "DELETED",
            FindingKind::Inserted => "INSERTED",
            FindingKind::Checkpoint => "CHECKPOINT",
        };
        write!(f, "{kind}")?;
        if let Some(e) = &self.event {
            write!(f, " event {e}")?;
        }
        let mut parts = Vec::new();
        if let Some(id) = self.row_id {
            parts.push(format!("row id {id}"));
        }
        if let Some(t) = self.event_time {
            parts.push(format!("event_time {}", t.to_rfc3339()));
        }
        if let Some(l) = self.leaf_index {
            parts.push(format!("leaf {l}"));
        }
        if let Some(s) = self.snapshot_id {
            parts.push(format!("snapshot {s}"));
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// The outcome of `verify`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub snapshots_checked: u64,
    pub leaves_checked: u64,
    pub findings: Vec<Finding>,
    /// Events sealed after a snapshot had already sealed their time range
    /// (not a problem: they are listed so an auditor sees them as late,
    /// not as inserted).
    pub late: Vec<LateEvent>,
    /// Leaves whose rows retention dropped with their partition (not a
    /// problem: the ledger still holds their record digests, checked
    /// against the signed roots, and the rest of the log verifies).
    pub pruned: Vec<PrunedRange>,
    /// Sealed events some of whose personal values a GDPR erasure replaced
    /// (not a problem: their leaves still verify through the kept
    /// commitments, and every other field is still checked).
    pub erased: Vec<ErasedEvent>,
}

/// A partition dropped by retention, and how many of its leaves this
/// check met (see README, "Retention").
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrunedRange {
    pub partition: String,
    /// The event times it held: `[from, to)`.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub dropped_at: DateTime<Utc>,
    /// Sealed leaves it held when dropped.
    pub leaves: i64,
    /// Of those, the ones within this check's scope.
    pub leaves_checked: u64,
    /// The log's size when it was dropped: later leaves are never pruned.
    #[serde(skip)]
    tree_size: i64,
}

impl PrunedRange {
    /// Whether the ledger entry of leaf `leaf` at `time` names a row this
    /// drop removed.
    fn covers(&self, time: DateTime<Utc>, leaf: i64) -> bool {
        self.from <= time && time < self.to && leaf < self.tree_size
    }
}

impl std::fmt::Display for PrunedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PRUNED partition {} (events {} .. {}) dropped by retention at {}: {} leaves ({} in this check), \
             kept in the log as record digests; their rows and salts are gone",
            self.partition,
            self.from.to_rfc3339(),
            self.to.to_rfc3339(),
            self.dropped_at.to_rfc3339(),
            self.leaves,
            self.leaves_checked
        )
    }
}

/// The pruned range, if any, that explains leaf `leaf`'s missing row.
fn pruned_leaf(pruned: &mut [PrunedRange], time: DateTime<Utc>, leaf: i64) -> bool {
    match pruned.iter_mut().find(|p| p.covers(time, leaf)) {
        Some(p) => {
            p.leaves_checked += 1;
            true
        }
        None => false,
    }
}

/// A sealed event whose personal values were erased, and by which request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErasedEvent {
    pub event: String,
    pub leaf_index: i64,
    pub event_time: DateTime<Utc>,
    /// The erased paths (`principalId`, `sessionContext.ipAddress`, ...).
    pub paths: Vec<String>,
    /// The erasure requests, with when each ran.
    pub requests: Vec<ErasureRef>,
}

/// One erasure request of an erased event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErasureRef {
    pub request: String,
    pub at: DateTime<Utc>,
}

impl std::fmt::Display for ErasedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by: Vec<String> = self
            .requests
            .iter()
            .map(|r| format!("request {} at {}", r.request, r.at.to_rfc3339()))
            .collect();
        write!(
            f,
            "ERASED event {} (leaf {}, event_time {}): {} replaced by pseudonyms by {}",
            self.event,
            self.leaf_index,
            self.event_time.to_rfc3339(),
            self.paths.join(", "),
            by.join(", ")
        )
    }
}

/// A late event: sealed by a later snapshot than its time range's.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LateEvent {
    pub event: String,
    pub leaf_index: i64,
    pub snapshot_id: i64,
    pub event_time: DateTime<Utc>,
    /// When it was stored (its ingested_at).
    pub arrived: DateTime<Utc>,
}

impl std::fmt::Display for LateEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LATE event {} (leaf {}, snapshot {}): event_time {} but arrived {}, after its period was sealed",
            self.event,
            self.leaf_index,
            self.snapshot_id,
            self.event_time.to_rfc3339(),
            self.arrived.to_rfc3339()
        )
    }
}

impl VerifyReport {
    /// Whether nothing was found.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    fn checkpoint(&mut self, snapshot: i64, detail: impl Into<String>) {
        self.findings.push(Finding {
            kind: FindingKind::Checkpoint,
            event: None,
            row_id: None,
            event_time: None,
            leaf_index: None,
            snapshot_id: Some(snapshot),
            detail: detail.into(),
        });
    }
}

/// One snapshot as stored, with its checkpoint once the signature checked.
struct StoredSnapshot {
    id: i64,
    range_from: Option<DateTime<Utc>>,
    range_to: DateTime<Utc>,
    previous_tree_size: i64,
    tree_size: i64,
    root: Vec<u8>,
    note: String,
    proof: Vec<Vec<u8>>,
    frontier: Vec<Vec<u8>>,
    /// The signed checkpoint, if the note opened.
    signed: Option<Checkpoint>,
    /// What the seal vouched for, if it sealed everything before its end.
    arrivals: Option<ArrivalsMark>,
}

const SNAPSHOT_COLUMNS: &str = "id, range_from, range_to, previous_tree_size, tree_size, root, \
     checkpoint_note, consistency_proof, frontier, arrivals_xmin, arrivals_before";

fn stored_snapshot(r: &Row) -> StoredSnapshot {
    StoredSnapshot {
        id: r.get(0),
        range_from: r.get(1),
        range_to: r.get(2),
        previous_tree_size: r.get(3),
        tree_size: r.get(4),
        root: r.get(5),
        note: r.get(6),
        proof: r.get(7),
        frontier: r.get(8),
        signed: None,
        arrivals: r
            .get::<_, Option<i64>>(9)
            .zip(r.get::<_, Option<DateTime<Utc>>>(10))
            .map(|(xmin, before)| ArrivalsMark { xmin, before }),
    }
}

/// A chunk's ledger entry columns (as `l`); the last is the late arrival.
const LEDGER_COLUMNS: &str = "l.leaf_index, l.snapshot_id, l.event_time, l.row_id, \
     l.idempotency_key, l.leaf, l.leaf_version, l.late_arrival";

/// Row columns read for checking a sealed row.
const ROW_COLUMNS: &str = "leaf_index, snapshot_id, id, event_time, idempotency_key, hash, \
     timestamp_raw, action, status, principal_id, organization_id, target_resource_type, \
     target_resource_id, outcome_description";

/// The planner settings of a lane while it reads chunks. A chunk's ledger
/// entries come fastest in order from the ledger's primary key: right after
/// sealing, the ledger's statistics are stale and the planner picks a
/// bitmap scan, a sort and two parallel workers per chunk, which cost 4.6
/// CPU-s of the database's time for 1,000,000 leaves instead of 3.9 (and
/// 6.1 with the workers), on a host where the lanes already use every core.
const CHUNK_PLANNER_SETTINGS: &str =
    "SET LOCAL max_parallel_workers_per_gather = 0; SET LOCAL enable_bitmapscan = off";

/// Undoes [`CHUNK_PLANNER_SETTINGS`] for the rest of the transaction.
const DEFAULT_PLANNER_SETTINGS: &str =
    "SET LOCAL max_parallel_workers_per_gather TO DEFAULT; SET LOCAL enable_bitmapscan TO DEFAULT";

/// Prepares a chunk's queries on `tx`'s connection, with
/// [`CHUNK_PLANNER_SETTINGS`] for the transaction; `erasures_join` is the
/// check's [`erasures_join_for`].
async fn chunk_queries(
    tx: &Transaction<'_>,
    erasures_join: &str,
) -> Result<ChunkQueries, SnapshotError> {
    tx.batch_execute(CHUNK_PLANNER_SETTINGS).await?;
    Ok(ChunkQueries {
        ledger: tx
            .prepare(&format!(
                "SELECT {LEDGER_COLUMNS} FROM seal_ledger l
                  WHERE l.leaf_index >= $1 AND l.leaf_index < $2 ORDER BY l.leaf_index"
            ))
            .await?,
        rows_in_range: tx
            .prepare(&format!(
                "SELECT a.id, {RECORD_COLUMNS_SALTS_APART} FROM audit_log a {erasures_join}
                  WHERE a.event_time >= $1 AND a.event_time <= $3
                    AND (a.event_time, a.id) >= ($1, $2) AND (a.event_time, a.id) <= ($3, $4)
                  ORDER BY a.event_time, a.id LIMIT $5"
            ))
            .await?,
        rows_by_key: tx
            .prepare(&format!(
                "SELECT a.id, {RECORD_COLUMNS_SALTS_APART}
                   FROM unnest($1::timestamptz[], $2::bigint[]) k(event_time, id)
                   JOIN audit_log a ON a.event_time = k.event_time AND a.id = k.id
                   {erasures_join}"
            ))
            .await?,
        salts: tx.prepare(SALTS_BY_ID_WINDOW).await?,
        claimants: tx
            .prepare(&format!(
                "SELECT {ROW_COLUMNS} FROM audit_log
                  WHERE leaf_index >= $1 AND leaf_index < $2 ORDER BY leaf_index"
            ))
            .await?,
    })
}

/// The canonical hash v1 of a stored row, recomputed from its fields.
fn recompute_hash(r: &Row) -> String {
    canonical_hash_v1(&HashedFields {
        timestamp: Some(r.get(6)),
        action: Some(r.get(7)),
        status: Some(r.get(8)),
        principal_id: r.get(9),
        organization_id: r.get(10),
        target_resource_type: r.get(11),
        target_resource_id: r.get(12),
        outcome_description: r.get(13),
    })
}

fn row_finding(kind: FindingKind, r: &Row, detail: String) -> Finding {
    Finding {
        kind,
        event: Some(r.get(4)),
        row_id: Some(r.get(2)),
        event_time: Some(r.get(3)),
        leaf_index: r.get(0),
        snapshot_id: r.get(1),
        detail,
    }
}

/// Which leaves `verify` re-checks (the checkpoint chain is always
/// checked whole: it is one row per snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every leaf.
    All,
    /// The leaves one snapshot appended.
    Snapshot(i64),
    /// The leaves appended after the checkpoint of this size (incremental
    /// verification: proportional to what was appended since).
    Since(u64),
}

/// Verifies the whole log (`only = None`) or one snapshot: every
/// checkpoint's signature and origin, the chain of sizes and consistency
/// proofs, and every sealed row against the ledger and the signed roots.
pub async fn verify(
    client: &mut tokio_postgres::Client,
    verifier: &NoteVerifier,
    origin: &str,
    only: Option<i64>,
    page: i32,
) -> Result<VerifyReport, SnapshotError> {
    let scope = only.map_or(Scope::All, Scope::Snapshot);
    verify_scope(client, verifier, origin, scope, page, &mut []).await
}

/// What `verify` finds in the row a leaf v2 ledger entry names: the work
/// per row (decoding, record digest, hash v1), done on a blocking thread
/// ([`CheckedLedger`]).
struct RowCheck {
    event_time: DateTime<Utc>,
    /// The record digest recomputed from the row (zeros when it cannot be).
    row_leaf: Hash,
    /// The erased paths and the erasures, when some values were erased.
    erased: Option<(Vec<String>, Vec<ErasureRef>)>,
    /// What no longer matches (empty: the row is as sealed).
    problems: Vec<String>,
}

/// Checks `row`, the row ledger entry `entry` names (`a.id` then
/// [`RECORD_COLUMNS_SALTS_APART`]), opened by `salts`, its stored salts;
/// `None` for a leaf v1 entry or a missing row.
fn check_row(entry: &Row, row: Option<&Row>, salts: Option<&str>) -> Option<RowCheck> {
    if entry.get::<_, i16>(6) != LEAF_VERSION_V2 {
        return None;
    }
    let leaf = hash_from_bytes(entry.get::<_, &[u8]>(5)).unwrap_or([0; 32]);
    let (rec, mut openings) = record_from_row(row?, 1)?;
    openings.salts = salts.map(str::to_owned);
    let digest = stored_digest(&rec, &openings);
    let erased_paths = openings.erased_paths();
    let mut problems = Vec::new();
    match &digest {
        Err(e) => problems.push(format!("its record digest cannot be computed: {e}")),
        Ok(d) if *d != leaf => problems.push(
            "its stored record no longer matches the sealed record digest \
             (a column or its salts changed)"
                .to_string(),
        ),
        Ok(_) => {}
    }
    // Hash v1 covers principalId and targetResourceId in clear: once one is
    // erased it cannot be recomputed (the record digest, which covers
    // `hash` itself, still binds every field).
    let hash_v1_erased = erased_paths
        .iter()
        .any(|p| p == "principalId" || p == "targetResourceId");
    if !hash_v1_erased
        && canonical_hash_v1(&HashedFields {
            timestamp: Some(&rec.timestamp_raw),
            action: Some(&rec.action),
            status: Some(&rec.status),
            principal_id: rec.principal_id.as_deref(),
            organization_id: rec.organization_id.as_deref(),
            target_resource_type: rec.target_resource_type.as_deref(),
            target_resource_id: rec.target_resource_id.as_deref(),
            outcome_description: rec.outcome_description.as_deref(),
        }) != rec.hash
    {
        problems.push("its hashed fields no longer match its hash".into());
    }
    let erased = openings.erased().then(|| {
        (
            erased_paths,
            openings
                .erasures
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default(),
        )
    });
    Some(RowCheck {
        event_time: rec.event_time,
        row_leaf: digest.unwrap_or([0; 32]),
        erased,
        problems,
    })
}

/// One chunk of leaves `[.., end)`: its ledger entries in leaf order, each
/// with its row checked, and the rows that claim one of its leaves by
/// their own `leaf_index` column (leaf v1 rows, or inserted rows).
struct CheckedChunk {
    end: i64,
    entries: Vec<(Row, Option<RowCheck>)>,
    claimants: Vec<Row>,
}

/// The queries of a chunk, prepared on one lane's connection.
struct ChunkQueries {
    /// The chunk's ledger entries ([`LEDGER_COLUMNS`]).
    ledger: Statement,
    /// The rows of a range of `audit_log`'s primary key, in its order, at
    /// most `$5` (`a.id`, then [`RECORD_COLUMNS_SALTS_APART`]).
    rows_in_range: Statement,
    /// The same columns for listed `(event_time, id)` keys.
    rows_by_key: Statement,
    /// [`SALTS_BY_ID_WINDOW`].
    salts: Statement,
    /// Rows claiming a leaf ([`ROW_COLUMNS`] by `leaf_index`).
    claimants: Statement,
}

/// How many chunks are in flight per connection: one being read while the
/// one before it is checked, so each connection always has a query queued.
const CHUNKS_IN_FLIGHT_PER_LANE: usize = 2;

/// A row's primary key in `audit_log`.
type RowKey = (DateTime<Utc>, i64);

/// The key of a row read by [`ChunkQueries::rows_in_range`] or
/// [`ChunkQueries::rows_by_key`].
fn read_row_key(r: &Row) -> RowKey {
    (r.get(3), r.get(0))
}

/// Reads one chunk of leaves on `tx`, then checks its rows
/// ([`check_row`]) on a blocking thread.
///
/// The rows and salts the chunk's leaf v2 entries name are read apart from
/// the ledger, mostly as one range of each key ([`key_windows`]): the
/// rows from the first to the last of the entries that are not late (they
/// were sealed in key order), the salts over [`key_windows::id_window`];
/// the rest, and whatever a range read cut off at its limit, by key. A row
/// that none of the reads returns does not exist in this snapshot.
async fn checked_chunk(
    tx: &Transaction<'_>,
    queries: &ChunkQueries,
    leaves: std::ops::Range<i64>,
) -> Result<CheckedChunk, SnapshotError> {
    let bounds: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&leaves.start, &leaves.end];
    let (ledger, claimants) = futures::try_join!(
        tx.query(&queries.ledger, &bounds),
        tx.query(&queries.claimants, &bounds)
    )?;
    // Per entry: the key of the row it names when it is leaf v2 (leaf v1
    // rows are checked through the claimants), and whether it came late.
    let wanted: Vec<Option<(RowKey, bool)>> = ledger
        .iter()
        .map(|l| {
            (l.get::<_, i16>(6) == LEAF_VERSION_V2).then(|| {
                let late = l.get::<_, Option<DateTime<Utc>>>(7).is_some();
                ((l.get(2), l.get(3)), late)
            })
        })
        .collect();
    let (mut in_order, mut by_key): (Vec<RowKey>, Vec<RowKey>) = (Vec::new(), Vec::new());
    for &(key, late) in wanted.iter().flatten() {
        if late {
            by_key.push(key)
        } else {
            in_order.push(key)
        }
    }
    let ids: Vec<i64> = wanted.iter().flatten().map(|w| w.0 .1).collect();
    let range = in_order.iter().min().zip(in_order.iter().max());
    let limit = key_windows::range_read_limit(in_order.len());
    let read_range = async {
        match range {
            Some((first, last)) => {
                tx.query(
                    &queries.rows_in_range,
                    &[&first.0, &first.1, &last.0, &last.1, &limit],
                )
                .await
            }
            None => Ok(Vec::new()),
        }
    };
    let (mut rows, listed, mut salts) = futures::try_join!(
        read_range,
        rows_by_keys(tx, queries, &by_key),
        salts_of_rows(tx, &queries.salts, ids)
    )?;
    if rows.len() as i64 == limit {
        // The range held more rows than the limit: read the rest by key.
        let last_read = rows.last().map(read_row_key);
        let rest: Vec<RowKey> = in_order
            .into_iter()
            .filter(|k| Some(*k) > last_read)
            .collect();
        rows.extend(rows_by_keys(tx, queries, &rest).await?);
    }
    rows.extend(listed);
    let entries = tokio::task::spawn_blocking(move || {
        let mut row_at = KeyIndex::new(rows.iter().map(read_row_key));
        ledger
            .into_iter()
            .zip(wanted)
            .map(|(l, wanted)| {
                let key = wanted.map(|w| w.0);
                let row = key.and_then(|k| row_at.find(&k)).map(|i| &rows[i]);
                let salt = key.and_then(|k| salts.get(k.1));
                let c = check_row(&l, row, salt);
                (l, c)
            })
            .collect()
    })
    .await
    .map_err(|e| SnapshotError::Integrity(format!("verify: {e}")))?;
    Ok(CheckedChunk {
        end: leaves.end,
        entries,
        claimants,
    })
}

/// The rows of `keys` ([`ChunkQueries::rows_by_key`]); none for no keys.
async fn rows_by_keys(
    tx: &Transaction<'_>,
    queries: &ChunkQueries,
    keys: &[RowKey],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let (times, ids): (Vec<DateTime<Utc>>, Vec<i64>) = keys.iter().copied().unzip();
    tx.query(&queries.rows_by_key, &[&times, &ids]).await
}

/// The ledger entries in leaf order, each with its row checked
/// ([`check_row`]), and the rows claiming each leaf.
///
/// The leaves are read in chunks of one page, chunk `k` on lane `k mod
/// lanes`: a lane is a transaction on its own connection, all of them in
/// one exported snapshot, so the database serves them on as many backends
/// while this process checks the chunks already read. Chunks come back in
/// leaf order whichever lane finishes first. Every query of the check's
/// leaf loop goes through here: a query awaited beside these on the same
/// connection would wait behind a chunk nobody is reading.
struct CheckedLedger<'a> {
    chunks: futures::stream::BoxStream<'a, Result<CheckedChunk, SnapshotError>>,
    /// The leaves below this are loaded.
    loaded_until: i64,
    entries: std::collections::VecDeque<(Row, Option<RowCheck>)>,
    claimants: std::collections::VecDeque<Row>,
}

impl<'a> CheckedLedger<'a> {
    /// Reads leaves `[start, end)` through `lanes`, `page` leaves per chunk.
    fn new(
        lanes: &'a [(&'a Transaction<'a>, ChunkQueries)],
        start: i64,
        end: i64,
        page: i32,
    ) -> Self {
        use futures::StreamExt;
        let page = i64::from(page.max(1));
        let depth = lanes.len() * CHUNKS_IN_FLIGHT_PER_LANE;
        let chunks = futures::stream::iter((start..end).step_by(page as usize).enumerate())
            .map(move |(k, from)| {
                let (tx, queries) = &lanes[k % lanes.len()];
                checked_chunk(tx, queries, from..(from + page).min(end))
            })
            .buffered(depth)
            .boxed();
        Self {
            chunks,
            loaded_until: start,
            entries: Default::default(),
            claimants: Default::default(),
        }
    }

    /// The ledger entry of leaf `i` with its check, and the rows claiming
    /// leaf `i`. Leaves must be asked for in increasing order.
    async fn leaf(
        &mut self,
        i: i64,
    ) -> Result<(Option<(Row, Option<RowCheck>)>, Vec<Row>), SnapshotError> {
        use futures::StreamExt;
        while i >= self.loaded_until {
            let Some(chunk) = self.chunks.next().await else {
                break;
            };
            let chunk = chunk?;
            self.loaded_until = chunk.end;
            self.entries.extend(chunk.entries);
            self.claimants.extend(chunk.claimants);
        }
        let entry = match self.entries.front() {
            Some((r, _)) if r.get::<_, i64>(0) == i => self.entries.pop_front(),
            _ => None,
        };
        let mut claimants = Vec::new();
        while self
            .claimants
            .front()
            .is_some_and(|r| r.get::<_, Option<i64>>(0) == Some(i))
        {
            claimants.extend(self.claimants.pop_front());
        }
        Ok((entry, claimants))
    }
}

/// The two trees `verify` grows side by side: one from the ledger's leaves,
/// one from the leaves recomputed from the rows. While every row gives the
/// ledger's leaf the two are the same tree, built once; the row tree forks
/// at the first leaf that differs.
struct Trees {
    ledger: TreeBuilder,
    /// `None`: identical to `ledger` so far.
    rows: Option<TreeBuilder>,
}

impl Trees {
    fn new(start: TreeBuilder) -> Self {
        Self {
            ledger: start,
            rows: None,
        }
    }

    /// Appends one leaf to each tree (leaf hashes).
    fn push(&mut self, ledger: Hash, row: Hash) {
        match &mut self.rows {
            Some(rows) => rows.push(row),
            None if row == ledger => {}
            None => {
                let mut rows = self.ledger.clone();
                rows.push(row);
                self.rows = Some(rows);
            }
        }
        self.ledger.push(ledger);
    }

    /// The ledger's root and the rows' root.
    fn roots(&self) -> (Hash, Hash) {
        let ledger = self.ledger.root();
        (ledger, self.rows.as_ref().map_or(ledger, TreeBuilder::root))
    }
}

/// The tree state after snapshot `p`, from its stored frontier, trusted
/// only because it reproduces the signed root (a different frontier with
/// the same root would be a SHA-256 second preimage).
fn builder_after(p: &StoredSnapshot) -> Option<TreeBuilder> {
    let frontier: Option<Vec<Hash>> = p.frontier.iter().map(|h| hash_from_bytes(h)).collect();
    let b = frontier.and_then(|f| TreeBuilder::from_frontier(p.tree_size as u64, f).ok())?;
    match &p.signed {
        Some(cp) if b.root() == *cp.root() => Some(b),
        _ => None,
    }
}

/// [`verify`] over a [`Scope`]; `Scope::Since(n)` checks the leaves from
/// `n` on against the checkpoints after the one of size `n`, whose
/// consistency with it is part of the chain.
///
/// `helpers` are more connections to the same database, each joining this
/// check's snapshot, so all see exactly the same data. With one, the leaves
/// are read through both connections at once (see [`CheckedLedger`]):
/// about 30% less wall time on a large log on two cores, since reading
/// the rows is as much of the work as checking them. A second one looks for
/// unsealed rows in sealed ranges while the leaves are read, instead of
/// after them. The findings are the same, in the same order, either way.
pub async fn verify_scope(
    client: &mut tokio_postgres::Client,
    verifier: &NoteVerifier,
    origin: &str,
    scope: Scope,
    page: i32,
    helpers: &mut [Client],
) -> Result<VerifyReport, SnapshotError> {
    let (only, since) = match scope {
        Scope::All => (None, 0),
        Scope::Snapshot(id) => (Some(id), 0),
        Scope::Since(n) => (None, n),
    };
    let mut report = VerifyReport::default();
    // One consistent view of the whole database for the whole check.
    let tx = crate::db::read_only_snapshot(client).await?;

    // 1. The checkpoint chain. Snapshots are few (one per schedule slot).
    let mut snapshots: Vec<StoredSnapshot> = tx
        .query(
            &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY id"),
            &[],
        )
        .await?
        .iter()
        .map(stored_snapshot)
        .collect();
    if let Some(id) = only {
        if !snapshots.iter().any(|s| s.id == id) {
            return Err(SnapshotError::BadRequest(format!(
                "snapshot {id} does not exist: `audit-worker verify` without --snapshot lists them all"
            )));
        }
    }
    let mut prev: Option<Checkpoint> = None;
    for s in &mut snapshots {
        report.snapshots_checked += 1;
        match open_note(&s.note, verifier) {
            Err(e) => report.checkpoint(s.id, format!("checkpoint note does not verify: {e}")),
            Ok(cp) => {
                if cp.origin() != origin {
                    report.checkpoint(
                        s.id,
                        format!(
                            "checkpoint origin {:?} is not this log's ({origin:?})",
                            cp.origin()
                        ),
                    );
                }
                if cp.size() != s.tree_size as u64 || cp.root()[..] != s.root[..] {
                    report.checkpoint(
                        s.id,
                        "stored tree size or root differs from the signed checkpoint",
                    );
                }
                s.signed = Some(cp);
            }
        }
        let (prev_size, prev_root) = match &prev {
            Some(p) => (p.size(), *p.root()),
            None => (0, merkle::empty_root()),
        };
        if let Some(cp) = &s.signed {
            if s.previous_tree_size as u64 != prev_size {
                report.checkpoint(
                    s.id,
                    format!(
                        "previous tree size {} does not continue the previous checkpoint ({prev_size})",
                        s.previous_tree_size
                    ),
                );
            }
            let proof: Option<Vec<Hash>> = s.proof.iter().map(|h| hash_from_bytes(h)).collect();
            let consistent = proof.is_some_and(|p| {
                merkle::verify_consistency(prev_size, cp.size(), &prev_root, cp.root(), &p).is_ok()
            });
            if !consistent {
                report.checkpoint(
                    s.id,
                    format!(
                        "consistency proof from tree size {prev_size} to {} does not verify: the log was rewritten",
                        cp.size()
                    ),
                );
            }
            prev = Some(cp.clone());
        }
    }
    let head: i64 = tx
        .query_one("SELECT tree_size FROM snapshot_log_head", &[])
        .await?
        .get(0);
    let last_size = snapshots.last().map_or(0, |s| s.tree_size);
    if only.is_none() && head != last_size {
        report.checkpoint(
            snapshots.last().map_or(0, |s| s.id),
            format!("log head says {head} leaves, the last snapshot {last_size}"),
        );
    }

    // 2. The leaves: which range, and the tree state before it.
    let (start, end, ledger_tree, scope): (u64, u64, TreeBuilder, Vec<usize>) = match only {
        None if since > 0 => {
            let Some(pos) = snapshots.iter().rposition(|s| s.tree_size as u64 == since) else {
                return Err(SnapshotError::BadRequest(format!(
                    "no checkpoint has tree size {since}: --since takes the size of a published checkpoint"
                )));
            };
            let Some(builder) = builder_after(&snapshots[pos]) else {
                report.checkpoint(
                    snapshots[pos].id,
                    "stored frontier does not reproduce the signed root: verify the whole log",
                );
                return Ok(report);
            };
            (
                since,
                last_size.max(0) as u64,
                builder,
                (pos + 1..snapshots.len()).collect(),
            )
        }
        None => (
            0,
            last_size.max(0) as u64,
            TreeBuilder::new(),
            (0..snapshots.len()).collect(),
        ),
        Some(id) => {
            let pos = snapshots.iter().position(|s| s.id == id).unwrap_or(0);
            let s = &snapshots[pos];
            let builder = if pos == 0 {
                TreeBuilder::new()
            } else {
                let p = &snapshots[pos - 1];
                match builder_after(p) {
                    Some(b) => b,
                    None => {
                        report.checkpoint(p.id, "stored frontier does not reproduce the signed root: verify the whole log");
                        return Ok(report);
                    }
                }
            };
            (
                s.previous_tree_size.max(0) as u64,
                s.tree_size.max(0) as u64,
                builder,
                vec![pos],
            )
        }
    };
    let mut trees = Trees::new(ledger_tree);
    // Signed roots to compare with, by tree size (empty snapshots share one).
    let mut boundaries: BTreeMap<u64, Vec<(i64, Hash)>> = BTreeMap::new();
    for &i in &scope {
        if let Some(cp) = &snapshots[i].signed {
            boundaries
                .entry(cp.size())
                .or_default()
                .push((snapshots[i].id, *cp.root()));
        }
    }
    let check_boundary = |size: u64, trees: &Trees, report: &mut VerifyReport| {
        if let Some(list) = boundaries.get(&size) {
            let (ledger_root, row_root) = trees.roots();
            for (id, root) in list {
                if ledger_root != *root {
                    report.checkpoint(*id, "seal ledger does not reproduce the signed root: ledger entries were changed");
                }
                if row_root != *root {
                    report.checkpoint(*id, "root recomputed from the rows differs from the signed checkpoint (see the events above)");
                }
            }
        }
    };
    check_boundary(start, &trees, &mut report);

    let (s, e) = (start as i64, end as i64);
    report.pruned = tx
        .query(
            "SELECT partition, range_from, range_to, dropped_at, leaf_count, tree_size
               FROM retention_prunes ORDER BY range_from, dropped_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| PrunedRange {
            partition: r.get(0),
            from: r.get(1),
            to: r.get(2),
            dropped_at: r.get(3),
            leaves: r.get(4),
            leaves_checked: 0,
            tree_size: r.get(5),
        })
        .collect();
    // A second connection, when given, reads every other chunk in this
    // transaction's snapshot, so it sees exactly what this one sees.
    let mut helpers = helpers.iter_mut();
    let (leaves_helper, unsealed_helper) = (helpers.next(), helpers.next());
    let helper_tx = match leaves_helper {
        Some(h) if e > s => Some(crate::db::join_snapshot(&tx, h).await?),
        _ => None,
    };
    let erasures_join = erasures_join_for(&tx).await?;
    let mut lanes = vec![(&tx, chunk_queries(&tx, erasures_join).await?)];
    if let Some(h) = &helper_tx {
        lanes.push((h, chunk_queries(h, erasures_join).await?));
    }
    // 4 (run now, beside the leaves, when a connection is free for it):
    // unsealed rows inside a sealed range. Its findings are reported in
    // their place below, after the leaves'.
    //    A check since a checkpoint looks, below the end its seal vouched
    //    for, only at rows stored after that seal read (see
    //    `crate::jobs::unsealed`): the rest is a full check's.
    let since_mark = match (since, scope.first()) {
        (1.., Some(&first)) => {
            let xmin = crate::db::snapshot_xmin(&tx).await?;
            snapshots[..first]
                .iter()
                .rev()
                .find_map(|s| s.arrivals)
                .and_then(|m| m.usable(xmin))
        }
        _ => None,
    };
    let unsealed_reads = check_reads(&sealed_ranges(&snapshots, &scope), since_mark);
    let unsealed_tx = match unsealed_helper {
        Some(h) if !unsealed_reads.is_empty() => Some(crate::db::join_snapshot(&tx, h).await?),
        _ => None,
    };
    let unsealed_early = async {
        match &unsealed_tx {
            Some(t) => Some(unsealed_rows(t, &unsealed_reads).await),
            None => None,
        }
    };
    let zero: Hash = [0; 32];
    let leaves = async {
        let mut ledger = CheckedLedger::new(&lanes, s, e, page);
        for index in start..end {
            let i = index as i64;
            let (entry, at_leaf) = ledger.leaf(i).await?;
            let Some((entry, checked)) = entry else {
                report.findings.push(Finding {
                    kind: FindingKind::Checkpoint,
                    event: None,
                    row_id: None,
                    event_time: None,
                    leaf_index: Some(i),
                    snapshot_id: None,
                    detail: "seal ledger entry is missing".into(),
                });
                for r in &at_leaf {
                    report.findings.push(row_finding(
                        FindingKind::Inserted,
                        r,
                        "claims a leaf whose ledger entry is missing".into(),
                    ));
                }
                trees.push(zero, zero);
                report.leaves_checked += 1;
                check_boundary(index + 1, &trees, &mut report);
                continue;
            };
            let l_snapshot: i64 = entry.get(1);
            let l_time: DateTime<Utc> = entry.get(2);
            let l_row: i64 = entry.get(3);
            // Borrowed: an owned copy per leaf is made only for a finding.
            let l_key: &str = entry.get(4);
            let leaf = hash_from_bytes(entry.get::<_, &[u8]>(5)).unwrap_or(zero);
            let ledger_hash = merkle::leaf_hash(&leaf);
            if let Some(arrived) = entry.get::<_, Option<DateTime<Utc>>>(7) {
                report.late.push(LateEvent {
                    event: l_key.to_owned(),
                    leaf_index: i,
                    snapshot_id: l_snapshot,
                    event_time: l_time,
                    arrived,
                });
            }
            if entry.get::<_, i16>(6) == LEAF_VERSION_V2 {
                // Leaf v2: the row is the one the ledger names; any row claiming
                // this leaf number was inserted (v2 rows never carry one).
                for r in &at_leaf {
                    report.findings.push(row_finding(
                        FindingKind::Inserted,
                        r,
                        format!("claims leaf {i}, which the ledger assigns to event {l_key}"),
                    ));
                }
                let row_leaf = match checked {
                    // Dropped by retention: the ledger's digest stands for it.
                    None if pruned_leaf(&mut report.pruned, l_time, i) => leaf,
                    None => {
                        report
                            .findings
                            .push(row_missing(l_key, l_row, l_time, i, l_snapshot));
                        zero
                    }
                    Some(c) => {
                        if let Some((paths, requests)) = c.erased {
                            report.erased.push(ErasedEvent {
                                event: l_key.to_owned(),
                                leaf_index: i,
                                event_time: c.event_time,
                                paths,
                                requests,
                            });
                        }
                        if !c.problems.is_empty() {
                            report.findings.push(Finding {
                                kind: FindingKind::Altered,
                                event: Some(l_key.to_owned()),
                                row_id: Some(l_row),
                                event_time: Some(c.event_time),
                                leaf_index: Some(i),
                                snapshot_id: Some(l_snapshot),
                                detail: c.problems.join("; "),
                            });
                        }
                        c.row_leaf
                    }
                };
                let row_hash = if row_leaf == leaf {
                    ledger_hash
                } else {
                    merkle::leaf_hash(&row_leaf)
                };
                trees.push(ledger_hash, row_hash);
                report.leaves_checked += 1;
                check_boundary(index + 1, &trees, &mut report);
                continue;
            }

            // The row the ledger sealed at this leaf; any other row claiming the
            // leaf was inserted.
            let primary = at_leaf
                .iter()
                .position(|r| r.get::<_, i64>(2) == l_row && r.get::<_, DateTime<Utc>>(3) == l_time)
                .or_else(|| (at_leaf.len() == 1).then_some(0));
            for (n, r) in at_leaf.iter().enumerate() {
                if Some(n) != primary {
                    report.findings.push(row_finding(
                        FindingKind::Inserted,
                        r,
                        format!("claims leaf {i}, which the ledger assigns to event {l_key}"),
                    ));
                }
            }
            match primary.map(|n| &at_leaf[n]) {
                None if pruned_leaf(&mut report.pruned, l_time, i) => {
                    trees.push(ledger_hash, ledger_hash);
                }
                None => {
                    report
                        .findings
                        .push(row_missing(l_key, l_row, l_time, i, l_snapshot));
                    trees.push(ledger_hash, zero);
                }
                Some(r) => {
                    let mut what = Vec::new();
                    let recomputed = recompute_hash(r);
                    let stored: String = r.get(5);
                    if recomputed != stored {
                        what.push("its fields no longer match its hash".to_string());
                    }
                    if stored != hex::encode(leaf) {
                        what.push("its hash differs from the sealed leaf".into());
                    }
                    if r.get::<_, i64>(2) != l_row || r.get::<_, DateTime<Utc>>(3) != l_time {
                        what.push("its id or event_time differs from the ledger".into());
                    }
                    if r.get::<_, &str>(4) != l_key {
                        what.push(format!(
                            "its idempotency key differs from the ledger ({l_key})"
                        ));
                    }
                    if r.get::<_, Option<i64>>(1) != Some(l_snapshot) {
                        what.push(format!(
                            "its snapshot id differs from the ledger ({l_snapshot})"
                        ));
                    }
                    if !what.is_empty() {
                        report
                            .findings
                            .push(row_finding(FindingKind::Altered, r, what.join("; ")));
                    }
                    let row_leaf = hex32(&recomputed).unwrap_or(zero);
                    trees.push(ledger_hash, merkle::leaf_hash(&row_leaf));
                }
            }
            report.leaves_checked += 1;
            check_boundary(index + 1, &trees, &mut report);
        }
        Ok::<(), SnapshotError>(())
    };
    let (leaves, unsealed_early) = tokio::join!(leaves, unsealed_early);
    leaves?;
    tx.batch_execute(DEFAULT_PLANNER_SETTINGS).await?;
    if let Some(h) = helper_tx {
        h.commit().await?;
    }

    // 3. Rows claiming leaves outside the signed log, and ledger entries
    //    beyond it.
    if only.is_none() {
        let extra = tx
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM audit_log WHERE leaf_index >= $1 OR leaf_index < 0
                      ORDER BY leaf_index LIMIT 10000"
                ),
                &[&e],
            )
            .await?;
        for r in &extra {
            report.findings.push(row_finding(
                FindingKind::Inserted,
                r,
                "claims a leaf beyond the last signed checkpoint".into(),
            ));
        }
        let beyond: i64 = tx
            .query_one(
                "SELECT count(*) FROM seal_ledger WHERE leaf_index >= $1",
                &[&e],
            )
            .await?
            .get(0);
        if beyond > 0 {
            report.checkpoint(
                snapshots.last().map_or(0, |s| s.id),
                format!("seal ledger holds {beyond} entries beyond the last signed checkpoint"),
            );
        }
    } else if let Some(&pos) = scope.first() {
        let id = snapshots[pos].id;
        let extra = tx
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM audit_log
                      WHERE snapshot_id = $1 AND (leaf_index < $2 OR leaf_index >= $3) LIMIT 10000"
                ),
                &[&id, &s, &e],
            )
            .await?;
        for r in &extra {
            report.findings.push(row_finding(
                FindingKind::Inserted,
                r,
                format!("claims snapshot {id} but a leaf outside it"),
            ));
        }
    }

    // 3b. The stored tiles (what proofs and /log/ readers use) must give
    //     every signed root they reach.
    let tiled = crate::jobs::tile_store::tiles_size(&tx).await?;
    for &i in &scope {
        let Some(cp) = &snapshots[i].signed else {
            continue;
        };
        if cp.size() == 0 || cp.size() > tiled {
            continue;
        }
        let root =
            crate::jobs::tile_store::range_hashes(&tx, std::slice::from_ref(&(0..cp.size())))
                .await?;
        if root.as_deref() != Some(&[*cp.root()][..]) {
            report.checkpoint(
                snapshots[i].id,
                format!(
                    "the stored tiles do not reproduce the signed root at size {}",
                    cp.size()
                ),
            );
        }
    }

    // 4. Unsealed rows inside a sealed range: either inserted after sealing
    //    or a late arrival the next snapshot has not sealed yet. Either way
    //    the signed log does not vouch for them, so they are reported.
    let unsealed = match unsealed_early {
        Some(rows) => rows?,
        None => unsealed_rows(&tx, &unsealed_reads).await?,
    };
    for r in &unsealed {
        report.findings.push(row_finding(
            FindingKind::Inserted,
            r,
            "unsealed row inside a sealed range: inserted after sealing, or a late arrival \
             that the next snapshot will seal"
                .into(),
        ));
    }
    if let Some(t) = unsealed_tx {
        t.commit().await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// The time ranges the snapshots in `scope` sealed, overlapping ones
/// merged: where an unsealed row means something was inserted.
fn sealed_ranges(snapshots: &[StoredSnapshot], scope: &[usize]) -> SealedRanges {
    SealedRanges::new(
        scope
            .iter()
            .map(|&i| (snapshots[i].range_from, snapshots[i].range_to))
            .collect(),
    )
}

/// The rows `reads` name that no ledger entry seals (at most 10,000 per
/// read): an anti-join of `audit_log` against the ledger.
async fn unsealed_rows(
    tx: &Transaction<'_>,
    reads: &[UnsealedRead],
) -> Result<Vec<Row>, SnapshotError> {
    let mut rows = Vec::new();
    for read in reads {
        rows.extend(
            tx.query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM audit_log a
                      WHERE a.snapshot_id IS NULL AND {}
                        AND NOT EXISTS (SELECT 1 FROM seal_ledger l
                                         WHERE l.event_time = a.event_time AND l.row_id = a.id)
                      ORDER BY event_time, id LIMIT 10000",
                    read.condition()
                ),
                &read.params(),
            )
            .await?,
        );
    }
    Ok(rows)
}

/// A v2 proof's printed record must give its leaf, and the printed event,
/// time and hash must be the record's: nothing printed goes unproven.
fn check_record(proof: &InclusionProof, digest_hex: &str) -> Result<(), String> {
    let record = proof
        .record
        .as_ref()
        .ok_or("a leaf v2 proof needs the record it proves")?;
    let digest = digest_of_object(record)?;
    if hex::encode(digest) != digest_hex {
        return Err("the record in the proof does not give its recordDigest".into());
    }
    let field = |k: &str| record.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    if field("idempotencyKey") != proof.event {
        return Err(format!(
            "the proof names event {:?} but its record is event {:?}",
            proof.event,
            field("idempotencyKey")
        ));
    }
    if field("eventTime") != timestamp_text(&proof.event_time) {
        return Err(format!(
            "the proof's eventTime {} is not its record's ({})",
            timestamp_text(&proof.event_time),
            field("eventTime")
        ));
    }
    if field("hash") != proof.event_hash {
        return Err("the proof's eventHash is not its record's hash".into());
    }
    if proof.row_id.is_some() {
        return Err("a leaf v2 proof cannot prove a row id: remove rowId".into());
    }
    Ok(())
}

fn leaf_version_v1() -> i16 {
    LEAF_VERSION_V1
}

/// An inclusion proof as `prove` prints it; everything an auditor needs
/// with the verifier key (see README, "Verifying a proof offline").
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InclusionProof {
    pub format: String,
    /// The event's idempotency key (its eventId when it had one).
    pub event: String,
    /// The row's id (leaf v1 proofs only: it is not part of a v2 record,
    /// so a v2 proof does not print it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_id: Option<i64>,
    pub event_time: DateTime<Utc>,
    /// The event's canonical hash v1 (hex); the Merkle leaf data of leaf v1.
    pub event_hash: String,
    /// 1: the leaf data is `eventHash`; 2: it is `recordDigest`.
    #[serde(default = "leaf_version_v1")]
    pub leaf_version: i16,
    /// The event's record digest (hex, leaf v2): the Merkle leaf data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_digest: Option<String>,
    /// The stored record as it is encoded (leaf v2; personal values as
    /// their commitments): `verify-proof` recomputes the leaf from it, and
    /// the event, time and hash printed above must be the record's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub record: Option<serde_json::Value>,
    pub leaf_index: u64,
    /// The tree size of the checkpoint; it must equal the size in the note.
    pub tree_size: u64,
    /// Audit path, hex, from the leaf's sibling up (RFC 6962 / RFC 9162).
    pub inclusion_proof: Vec<String>,
    /// The signed checkpoint note.
    pub checkpoint: String,
    pub key_name: String,
    /// The snapshot that sealed the event, and the one whose checkpoint is used.
    pub sealed_by_snapshot: i64,
    pub checkpoint_snapshot: i64,
}

/// Builds the inclusion proof of `event` (an idempotency key / eventId)
/// against the latest checkpoint, streaming the ledger once.
pub async fn prove(
    client: &mut tokio_postgres::Client,
    event: &str,
    page: i32,
) -> Result<InclusionProof, SnapshotError> {
    let tx = crate::db::read_only_snapshot(client).await?;
    // The ledger says which leaf sealed the event (rows sealed with leaf
    // v1 also carry it; v2 rows do not). The key's rows are found through
    // audit_log's key index first (MATERIALIZED), then their entries
    // through the ledger's (event_time, row_id) index: the ledger has no
    // key index (it would cost every sealed event), and with `ORDER BY
    // event_time LIMIT` on the ledger itself the planner may walk the
    // whole ledger index, which takes seconds on a large log whose
    // statistics are not fresh.
    let sealed = tx
        .query(
            &format!(
                "WITH hits AS MATERIALIZED (
                     SELECT id, event_time, hash FROM audit_log WHERE idempotency_key = $1 LIMIT 10)
                 SELECT {SEALED_ENTRY_COLUMNS}
                   FROM hits a
                   JOIN seal_ledger l ON l.event_time = a.event_time AND l.row_id = a.id
                  ORDER BY l.event_time"
            ),
            &[&event],
        )
        .await?;
    let r = match sealed.len() {
        0 => {
            let stored: i64 = tx
                .query_one(
                    "SELECT count(*) FROM audit_log WHERE idempotency_key = $1",
                    &[&event],
                )
                .await?
                .get(0);
            // Not stored: perhaps dropped by retention with its partition
            // (its ledger entry stays). Only the pruned ranges of the
            // ledger are searched.
            let pruned = if stored == 0 {
                tx.query_opt(
                    "SELECT p.partition, p.dropped_at FROM retention_prunes p
                       JOIN seal_ledger l ON l.event_time >= p.range_from AND l.event_time < p.range_to
                                         AND l.leaf_index < p.tree_size
                      WHERE l.idempotency_key = $1
                      ORDER BY p.dropped_at LIMIT 1",
                    &[&event],
                )
                .await?
            } else {
                None
            };
            if let Some(p) = pruned {
                return Err(SnapshotError::BadRequest(pruned_message(
                    event,
                    &p.get::<_, String>(0),
                    p.get(1),
                )));
            }
            return Err(SnapshotError::BadRequest(if stored == 0 {
                format!("no stored event has eventId / idempotency key {event:?}")
            } else {
                format!(
                    "event {event:?} is not sealed yet: wait for the next snapshot or run `audit-worker snapshot`"
                )
            }));
        }
        1 => &sealed[0],
        _ => {
            return Err(SnapshotError::BadRequest(format!(
                "several sealed events share the key {event:?}; they differ by timestamp"
            )))
        }
    };
    let entry = SealedEntry::from_row(event, r);
    let latest = latest_checkpoint(&tx).await?.ok_or_else(|| {
        SnapshotError::BadRequest("no snapshot was taken yet: run `audit-worker snapshot`".into())
    })?;
    let proof = proof_of_entry(&tx, &entry, &latest, page).await?;
    tx.commit().await?;
    Ok(proof)
}

/// Why an event retention dropped cannot be proven any more.
fn pruned_message(event: &str, partition: &str, dropped_at: DateTime<Utc>) -> String {
    format!(
        "event {event:?} was removed by retention with partition {partition} at {}: its leaf stays \
         in the log as its record digest, but its record is gone, so it cannot be proven any more",
        dropped_at.to_rfc3339()
    )
}

/// The log's latest signed checkpoint, which proofs are made against.
#[derive(Debug, Clone)]
pub struct LatestCheckpoint {
    pub snapshot_id: i64,
    pub size: u64,
    pub note: String,
    pub key_name: String,
}

/// The checkpoint at the log head, `None` before the first snapshot.
pub async fn latest_checkpoint(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<LatestCheckpoint>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT s.id, s.tree_size, s.checkpoint_note, s.key_name
               FROM snapshot_log_head h JOIN snapshots s ON s.id = h.snapshot_id",
            &[],
        )
        .await?
        .map(|r| LatestCheckpoint {
            snapshot_id: r.get(0),
            size: r.get::<_, i64>(1) as u64,
            note: r.get(2),
            key_name: r.get(3),
        }))
}

/// A seal ledger entry as a proof needs it.
struct SealedEntry {
    event: String,
    row_id: i64,
    event_time: DateTime<Utc>,
    leaf: Vec<u8>,
    leaf_index: u64,
    snapshot_id: i64,
    leaf_version: i16,
    /// The row's hash v1 (None when the row is gone).
    hash: Option<String>,
}

/// The ledger columns [`SealedEntry::from_row`] reads, with the row's hash
/// (`l` the ledger, `a` audit_log joined on the entry).
const SEALED_ENTRY_COLUMNS: &str =
    "l.row_id, l.event_time, l.leaf, l.leaf_index, l.snapshot_id, l.leaf_version, a.hash";

impl SealedEntry {
    fn from_row(event: &str, r: &Row) -> Self {
        Self {
            event: event.to_owned(),
            row_id: r.get(0),
            event_time: r.get(1),
            leaf: r.get(2),
            leaf_index: r.get::<_, i64>(3) as u64,
            snapshot_id: r.get(4),
            leaf_version: r.get(5),
            hash: r.get(6),
        }
    }
}

/// The inclusion proof of the row `(event_time, id)` against `latest`, or
/// `None` while the row is not sealed (or sealed after `latest`).
pub async fn prove_row(
    tx: &tokio_postgres::Transaction<'_>,
    event_time: DateTime<Utc>,
    id: i64,
    latest: &LatestCheckpoint,
    page: i32,
) -> Result<Option<InclusionProof>, SnapshotError> {
    let Some(r) = tx
        .query_opt(
            &format!(
                "SELECT {SEALED_ENTRY_COLUMNS}, l.idempotency_key FROM seal_ledger l
                   LEFT JOIN audit_log a ON a.event_time = l.event_time AND a.id = l.row_id
                  WHERE l.event_time = $1 AND l.row_id = $2 AND l.leaf_index < $3"
            ),
            &[&event_time, &id, &(latest.size as i64)],
        )
        .await?
    else {
        return Ok(None);
    };
    let entry = SealedEntry::from_row(r.get(7), &r);
    proof_of_entry(tx, &entry, latest, page).await.map(Some)
}

/// The inclusion proof of a ledger entry against `latest`, from the tiles
/// (O(log n)), or from the ledger for a log whose tiles do not reach that
/// size yet.
async fn proof_of_entry(
    tx: &tokio_postgres::Transaction<'_>,
    entry: &SealedEntry,
    latest: &LatestCheckpoint,
    page: i32,
) -> Result<InclusionProof, SnapshotError> {
    let event = entry.event.as_str();
    let leaf_index = entry.leaf_index;
    let leaf_version = entry.leaf_version;
    let leaf_data = hex::encode(&entry.leaf);
    let size = latest.size;
    let ranges = merkle::inclusion_proof_ranges(leaf_index, size)
        .map_err(|e| SnapshotError::Integrity(e.to_string()))?;
    // From the stored tiles (O(log n) tiles); a log whose tiles do not
    // reach this size yet (sealed before tiles existed, until its next
    // snapshot) is read from the ledger instead.
    let nodes = match crate::jobs::tile_store::range_hashes(tx, &ranges).await? {
        Some(nodes) => nodes,
        None => {
            let mut hasher = RangeHasher::new(ranges);
            let begin = hasher.start().unwrap_or(0) as i64;
            let mut leaves = PagedRows::open(
                tx,
                "SELECT leaf_index, leaf FROM seal_ledger WHERE leaf_index >= $1 AND leaf_index < $2
                  ORDER BY leaf_index",
                &[&begin, &(size as i64)],
                page,
            )
            .await?;
            while let Some(row) = leaves.next().await? {
                let i: i64 = row.get(0);
                let leaf = hash_from_bytes(row.get::<_, &[u8]>(1)).ok_or_else(|| {
                    SnapshotError::Integrity(format!("ledger leaf {i} is not 32 bytes"))
                })?;
                hasher.feed(i as u64, &merkle::leaf_hash(&leaf));
            }
            drop(leaves);
            hasher.finish().ok_or_else(|| {
                SnapshotError::Integrity(
                    "the seal ledger is missing leaves: run `audit-worker verify`".into(),
                )
            })?
        }
    };
    let v2 = leaf_version == LEAF_VERSION_V2;
    let record = if v2 {
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM audit_log a {SALTS_JOIN}
                      WHERE a.event_time = $1 AND a.id = $2"
                ),
                &[&entry.event_time, &entry.row_id],
            )
            .await?;
        let (rec, openings) = row
            .as_ref()
            .and_then(|row| record_from_row(row, 0))
            .ok_or_else(|| {
                SnapshotError::Integrity(format!(
                    "the sealed row of event {event:?} is missing: run `audit-worker verify`"
                ))
            })?;
        Some(stored_object(&rec, &openings).map_err(SnapshotError::Integrity)?)
    } else {
        None
    };
    Ok(InclusionProof {
        format: if v2 {
            "audit-worker.inclusion-proof.v2"
        } else {
            "audit-worker.inclusion-proof.v1"
        }
        .into(),
        event: event.to_owned(),
        row_id: (!v2).then_some(entry.row_id),
        event_time: entry.event_time,
        event_hash: if v2 {
            entry.hash.clone().unwrap_or_default()
        } else {
            leaf_data.clone()
        },
        leaf_version,
        record_digest: v2.then_some(leaf_data),
        record,
        leaf_index,
        tree_size: size,
        inclusion_proof: nodes.iter().map(hex::encode).collect(),
        checkpoint: latest.note.clone(),
        key_name: latest.key_name.clone(),
        sealed_by_snapshot: entry.snapshot_id,
        checkpoint_snapshot: latest.snapshot_id,
    })
}

/// Checks a proof offline with only the verifier key: the note's
/// signature, then the inclusion of the event hash under the signed root
/// at the signed size. Returns the checkpoint on success.
pub fn verify_proof(
    proof: &InclusionProof,
    verifier: &NoteVerifier,
    origin: &str,
) -> Result<Checkpoint, String> {
    let cp = open_note(&proof.checkpoint, verifier).map_err(|e| {
        format!(
            "checkpoint does not verify with key {}: {e}",
            verifier.name()
        )
    })?;
    if cp.origin() != origin {
        return Err(format!(
            "the checkpoint is of log {:?}, not the expected {origin:?}",
            cp.origin()
        ));
    }
    if cp.size() != proof.tree_size {
        return Err(format!(
            "proof claims tree size {} but the signed checkpoint says {}",
            proof.tree_size,
            cp.size()
        ));
    }
    let (data, name) = match (proof.leaf_version, &proof.record_digest) {
        (1, _) => (&proof.event_hash, "eventHash"),
        (2, Some(d)) => {
            check_record(proof, d)?;
            (d, "recordDigest")
        }
        (2, None) => return Err("a leaf v2 proof needs recordDigest".into()),
        (v, _) => return Err(format!("leafVersion {v} is not 1 or 2")),
    };
    let leaf: Hash = hex32(data).ok_or(format!("{name} must be 64 hex digits"))?;
    let nodes: Vec<Hash> = proof
        .inclusion_proof
        .iter()
        .map(|h| hex32(h))
        .collect::<Option<_>>()
        .ok_or("inclusionProof entries must be 64 hex digits")?;
    merkle::verify_inclusion(
        &merkle::leaf_hash(&leaf),
        proof.leaf_index,
        cp.size(),
        &nodes,
        cp.root(),
    )
    .map_err(|e| format!("inclusion proof does not verify: {e}"))?;
    Ok(cp)
}

/// The finding for a ledger entry whose audit row is gone.
fn row_missing(
    key: &str,
    row_id: i64,
    event_time: DateTime<Utc>,
    leaf_index: i64,
    snapshot_id: i64,
) -> Finding {
    Finding {
        kind: FindingKind::Deleted,
        event: Some(key.to_owned()),
        row_id: Some(row_id),
        event_time: Some(event_time),
        leaf_index: Some(leaf_index),
        snapshot_id: Some(snapshot_id),
        detail: "sealed event's row is missing".into(),
    }
}
