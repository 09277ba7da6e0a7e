//! Published checkpoints: every signed checkpoint is also written to the
//! object store, append-only (never overwritten), outside the database. A
//! later log must extend the last published one: deleting the newest
//! snapshots, ledger entries or rows, or resetting the log head, is then
//! detected even when the database is internally consistent again.

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::integrity::checkpoint::{open_note, NoteVerifier};
use crate::integrity::merkle::{self, TreeBuilder};
use crate::jobs::merkle_stream::{hash_from_bytes, PagedRows};
use crate::jobs::snapshot::{sanitize_segment, SnapshotError};
use crate::jobs::verify::{Finding, FindingKind};
use crate::storage::Storage;

/// The folder of published checkpoints:
/// `<manifest_prefix>/<sanitised origin>/checkpoints`.
pub fn folder(manifest_prefix: &str, origin: &str) -> String {
    let mut parts: Vec<String> = manifest_prefix
        .split('/')
        .filter(|s| !s.is_empty())
        .map(sanitize_segment)
        .collect();
    parts.push(sanitize_segment(origin));
    parts.push("checkpoints".into());
    parts.join("/")
}

/// Publishes `note` (of a log of `size` leaves) as `<folder>/<size>.note`
/// (size zero-padded to 20 digits, so names sort by size). Never
/// overwrites: publishing the same note again is a no-op, a different note
/// for a published size is an error (the log was rewritten).
pub async fn publish(
    storage: &Storage,
    folder: &str,
    size: u64,
    note: &str,
) -> Result<(), SnapshotError> {
    let path = StorePath::parse(format!("{folder}/{size:020}.note"))
        .map_err(|e| SnapshotError::Storage(e.to_string()))?;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match storage
        .store
        .put_opts(&path, PutPayload::from(note.as_bytes().to_vec()), opts)
        .await
    {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let existing = storage
                .store
                .get(&path)
                .await
                .map_err(|e| SnapshotError::Storage(e.to_string()))?
                .bytes()
                .await
                .map_err(|e| SnapshotError::Storage(e.to_string()))?;
            if existing.as_ref() == note.as_bytes() {
                Ok(())
            } else {
                Err(SnapshotError::Integrity(format!(
                    "a different checkpoint for size {size} is already published at {path}: \
                     the log was rewritten"
                )))
            }
        }
        Err(e) => Err(SnapshotError::Storage(e.to_string())),
    }
}

/// The published checkpoint with the largest size, if any.
pub async fn latest(storage: &Storage, folder: &str) -> Result<Option<String>, SnapshotError> {
    let prefix = StorePath::parse(folder).map_err(|e| SnapshotError::Storage(e.to_string()))?;
    let names: Vec<StorePath> = storage
        .store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(|e| SnapshotError::Storage(e.to_string()))?;
    let Some(last) = names
        .into_iter()
        .filter(|p| p.as_ref().ends_with(".note"))
        .max_by(|a, b| a.as_ref().cmp(b.as_ref()))
    else {
        return Ok(None);
    };
    let bytes = storage
        .store
        .get(&last)
        .await
        .map_err(|e| SnapshotError::Storage(e.to_string()))?
        .bytes()
        .await
        .map_err(|e| SnapshotError::Storage(e.to_string()))?;
    String::from_utf8(bytes.to_vec())
        .map(Some)
        .map_err(|_| SnapshotError::Storage(format!("{last} is not UTF-8 text")))
}

fn problem(detail: String) -> Finding {
    Finding {
        kind: FindingKind::Checkpoint,
        event: None,
        row_id: None,
        event_time: None,
        leaf_index: None,
        snapshot_id: None,
        detail,
    }
}

/// Checks that the database's log extends the trusted checkpoint `note`:
/// its head and ledger reach the trusted size, a snapshot has that size,
/// and the ledger's tree at that size has the trusted root. Returns what
/// is wrong, naming what is missing.
pub async fn check_extends(
    client: &mut tokio_postgres::Client,
    verifier: &NoteVerifier,
    origin: &str,
    note: &str,
    page: i32,
) -> Result<Vec<Finding>, SnapshotError> {
    let cp = match open_note(note, verifier) {
        Ok(cp) => cp,
        Err(e) => {
            return Ok(vec![problem(format!(
                "the trusted checkpoint does not verify with the verifier key: {e}"
            ))])
        }
    };
    if cp.origin() != origin {
        return Ok(vec![problem(format!(
            "the trusted checkpoint is of log {:?}, not {origin:?}",
            cp.origin()
        ))]);
    }
    let size = cp.size();
    let tx = crate::db::read_only_snapshot(client).await?;
    let head: i64 = tx
        .query_one("SELECT tree_size FROM snapshot_log_head", &[])
        .await?
        .get(0);
    let ledger: i64 = tx
        .query_one(
            "SELECT count(*) FROM seal_ledger WHERE leaf_index < $1",
            &[&(size as i64)],
        )
        .await?
        .get(0);
    let snapshot: Option<i64> = tx
        .query_opt(
            "SELECT id FROM snapshots WHERE tree_size = $1 ORDER BY id LIMIT 1",
            &[&(size as i64)],
        )
        .await?
        .map(|r| r.get(0));
    let mut out = Vec::new();
    if (head as u64) < size {
        out.push(problem(format!(
            "the log head says {head} leaves but the trusted checkpoint has {size}: the log was \
             truncated or rolled back (leaves {head}..{size} are not in the log)"
        )));
    }
    if (ledger as u64) < size {
        out.push(problem(format!(
            "the seal ledger holds {ledger} of the trusted checkpoint's {size} leaves: {} ledger \
             entries are missing",
            size - ledger as u64
        )));
    }
    if snapshot.is_none() {
        out.push(problem(format!(
            "no snapshot has the trusted checkpoint's size {size}: the snapshot that published it \
             is missing"
        )));
    }
    if out.is_empty() {
        // From the tiles (O(log n)) when they reach that far, else from
        // the ledger.
        let root =
            match crate::jobs::tile_store::range_hashes(&tx, std::slice::from_ref(&(0..size)))
                .await?
            {
                Some(r) => r[0],
                None => {
                    let mut tree = TreeBuilder::new();
                    let mut leaves = PagedRows::open(
                        &tx,
                        "SELECT leaf FROM seal_ledger WHERE leaf_index < $1 ORDER BY leaf_index",
                        &[&(size as i64)],
                        page,
                    )
                    .await?;
                    while let Some(r) = leaves.next().await? {
                        let leaf = hash_from_bytes(r.get::<_, &[u8]>(0)).unwrap_or([0; 32]);
                        tree.push(merkle::leaf_hash(&leaf));
                    }
                    tree.root()
                }
            };
        if root != *cp.root() {
            out.push(problem(format!(
                "the log at size {size} no longer has the trusted checkpoint's root: its first \
                 {size} leaves were rewritten"
            )));
        }
    }
    tx.commit().await?;
    Ok(out)
}
