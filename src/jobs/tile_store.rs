//! The tlog tiles in PostgreSQL (`log_tiles`): extended by each sealing
//! transaction, read by `prove` (O(log n) tiles per proof) and by the
//! HTTP listener's `/log/` endpoints. The tiling itself is pure, in
//! [`crate::integrity::tiles`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use tokio_postgres::GenericClient;

use crate::integrity::merkle::{self, Hash};
use crate::integrity::tiles::{
    fold_nodes, node_from_tile, range_nodes, tiles_to_write, TILE_HEIGHT, TILE_WIDTH,
};
use crate::jobs::merkle_stream::{hash_from_bytes, PagedRows};
use crate::jobs::snapshot::SnapshotError;

fn split_hashes(bytes: &[u8]) -> Vec<Hash> {
    bytes
        .chunks_exact(32)
        .map(|c| hash_from_bytes(c).expect("32-byte chunk"))
        .collect()
}

/// How many leaves the stored level-0 tiles cover.
pub async fn tiles_size(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT idx, length(hashes) / 32 FROM log_tiles WHERE level = 0 ORDER BY idx DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map_or(0, |r| {
        r.get::<_, i64>(0) as u64 * TILE_WIDTH + r.get::<_, i32>(1) as u64
    }))
}

/// Extends the tiles from what they cover to `size` leaves, reading the
/// missing leaves from the seal ledger (so a log sealed before tiles
/// existed is tiled by its next snapshot).
pub async fn extend_tiles(
    tx: &tokio_postgres::Transaction<'_>,
    size: u64,
    page: i32,
) -> Result<(), SnapshotError> {
    let covered = tiles_size(tx).await?;
    if covered >= size {
        return Ok(());
    }
    let mut tiles = TileAppender::open(tx, covered, page).await?;
    let mut leaves = PagedRows::open(
        tx,
        "SELECT leaf_index, leaf FROM seal_ledger WHERE leaf_index >= $1 AND leaf_index < $2
          ORDER BY leaf_index",
        &[&(covered as i64), &(size as i64)],
        page,
    )
    .await?;
    while let Some(r) = leaves.next().await? {
        let i = r.get::<_, i64>(0) as u64;
        if i != tiles.size() {
            return Err(SnapshotError::Integrity(format!(
                "ledger leaf {} is missing (found {i})",
                tiles.size()
            )));
        }
        let leaf = hash_from_bytes(r.get::<_, &[u8]>(1))
            .ok_or_else(|| SnapshotError::Integrity(format!("ledger leaf {i} is not 32 bytes")))?;
        tiles.push(tx, merkle::leaf_hash(&leaf)).await?;
    }
    let at = tiles.finish(tx).await?;
    if at != size {
        return Err(SnapshotError::Integrity(format!(
            "ledger holds {at} leaves, expected {size}"
        )));
    }
    Ok(())
}

/// Tiles being extended leaf by leaf inside a sealing transaction: the
/// sealer pushes each new leaf hash as it appends the leaf to the ledger,
/// so the tiles never need the new leaves read back. Holds at most one
/// chunk of leaf hashes and the partial tile of each level (flat memory).
pub struct TileAppender {
    /// Leaves written to `log_tiles` so far.
    at: u64,
    /// The partial (not yet full) tile of each level at `at`.
    partial: BTreeMap<u32, (u64, Vec<Hash>)>,
    /// Leaf hashes pushed but not yet written.
    batch: Vec<Hash>,
    chunk: usize,
}

impl TileAppender {
    /// Starts at `covered`, which must be what the stored tiles cover
    /// ([`tiles_size`]); writes every `page` leaves (rounded up to a whole
    /// tile width).
    pub async fn open(
        tx: &tokio_postgres::Transaction<'_>,
        covered: u64,
        page: i32,
    ) -> Result<Self, SnapshotError> {
        let mut partial = BTreeMap::new();
        let mut level = 0u32;
        while level * TILE_HEIGHT < 64 && (covered >> (level * TILE_HEIGHT)) > 0 {
            let nodes = covered >> (level * TILE_HEIGHT);
            if nodes % TILE_WIDTH != 0 {
                let idx = nodes / TILE_WIDTH;
                let row = tx
                    .query_opt(
                        "SELECT hashes FROM log_tiles WHERE level = $1 AND idx = $2",
                        &[&(level as i16), &(idx as i64)],
                    )
                    .await?;
                if let Some(r) = row {
                    partial.insert(level, (idx, split_hashes(r.get::<_, &[u8]>(0))));
                }
            }
            level += 1;
        }
        let chunk = (page.max(256) as usize).next_multiple_of(TILE_WIDTH as usize);
        Ok(Self {
            at: covered,
            partial,
            batch: Vec::with_capacity(chunk),
            chunk,
        })
    }

    /// The leaves pushed so far, counted from the start of the log.
    pub fn size(&self) -> u64 {
        self.at + self.batch.len() as u64
    }

    /// Appends the next leaf hash (`leaf_hash(leaf data)`).
    pub async fn push(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        leaf_hash: Hash,
    ) -> Result<(), SnapshotError> {
        self.batch.push(leaf_hash);
        if self.batch.len() >= self.chunk {
            self.flush(tx).await?;
        }
        Ok(())
    }

    /// Writes what is left; returns the size the tiles now cover.
    pub async fn finish(
        mut self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<u64, SnapshotError> {
        self.flush(tx).await?;
        Ok(self.at)
    }

    async fn flush(&mut self, tx: &tokio_postgres::Transaction<'_>) -> Result<(), SnapshotError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let partial = &self.partial;
        let tiles = tiles_to_write(self.at, &self.batch, &|l, i| {
            partial
                .get(&l)
                .filter(|(idx, _)| *idx == i)
                .map(|(_, h)| h.clone())
        })
        .map_err(SnapshotError::Integrity)?;
        let levels: Vec<i16> = tiles.iter().map(|t| t.level as i16).collect();
        let idxs: Vec<i64> = tiles.iter().map(|t| t.index as i64).collect();
        let blobs: Vec<Vec<u8>> = tiles.iter().map(|t| t.hashes.concat()).collect();
        tx.execute(
            "INSERT INTO log_tiles (level, idx, hashes)
             SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::bytea[])
             ON CONFLICT (level, idx) DO UPDATE SET hashes = EXCLUDED.hashes",
            &[&levels, &idxs, &blobs],
        )
        .await?;
        for t in tiles {
            if (t.hashes.len() as u64) < TILE_WIDTH {
                self.partial.insert(t.level, (t.index, t.hashes));
            } else {
                self.partial.remove(&t.level);
            }
        }
        self.at += self.batch.len() as u64;
        self.batch.clear();
        Ok(())
    }
}

/// `MTH(D[r])` for each range, from the stored tiles (one query for all
/// the tiles they need); `None` when the tiles do not reach that far.
pub async fn range_hashes(
    client: &impl GenericClient,
    ranges: &[Range<u64>],
) -> Result<Option<Vec<Hash>>, tokio_postgres::Error> {
    let nodes: Vec<Vec<_>> = ranges.iter().map(|r| range_nodes(r.clone())).collect();
    let wanted: BTreeSet<(u32, u64)> = nodes
        .iter()
        .flatten()
        .map(|n| {
            let (l, t, _) = n.tile_span();
            (l, t)
        })
        .collect();
    let levels: Vec<i16> = wanted.iter().map(|(l, _)| *l as i16).collect();
    let idxs: Vec<i64> = wanted.iter().map(|(_, t)| *t as i64).collect();
    let rows = client
        .query(
            "SELECT t.level, t.idx, t.hashes FROM log_tiles t
               JOIN UNNEST($1::smallint[], $2::bigint[]) AS w(level, idx)
                 ON t.level = w.level AND t.idx = w.idx",
            &[&levels, &idxs],
        )
        .await?;
    let tiles: BTreeMap<(u32, u64), Vec<Hash>> = rows
        .iter()
        .map(|r| {
            (
                (r.get::<_, i16>(0) as u32, r.get::<_, i64>(1) as u64),
                split_hashes(r.get::<_, &[u8]>(2)),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(ranges.len());
    for ns in &nodes {
        let mut roots = Vec::with_capacity(ns.len());
        for n in ns {
            let (l, t, _) = n.tile_span();
            let Some(h) = tiles.get(&(l, t)).and_then(|hs| node_from_tile(n, hs)) else {
                return Ok(None);
            };
            roots.push(h);
        }
        match fold_nodes(&roots) {
            Some(h) => out.push(h),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// The latest signed checkpoint note, if the log has one.
pub async fn latest_checkpoint(
    client: &impl GenericClient,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT s.checkpoint_note FROM snapshot_log_head h JOIN snapshots s ON s.id = h.snapshot_id",
            &[],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The bytes of a tile or entry bundle as tlog-tiles clients expect, or
/// `None` when the log does not (yet) hold that many hashes or entries.
/// An entry bundle holds each leaf's 32-byte leaf data (the record digest,
/// never event content), each behind a big-endian 16-bit length.
pub async fn tile_bytes(
    client: &impl GenericClient,
    request: &crate::integrity::tiles::TileRequest,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    use crate::integrity::tiles::TileRequest;
    match *request {
        TileRequest::Hashes {
            level,
            index,
            width,
        } => {
            let want = width.unwrap_or(TILE_WIDTH) as usize * 32;
            let row = client
                .query_opt(
                    "SELECT hashes FROM log_tiles WHERE level = $1 AND idx = $2",
                    &[&(level as i16), &(index as i64)],
                )
                .await?;
            Ok(row.and_then(|r| {
                let h: &[u8] = r.get(0);
                (h.len() >= want).then(|| h[..want].to_vec())
            }))
        }
        TileRequest::Entries { index, width } => {
            let want = width.unwrap_or(TILE_WIDTH) as i64;
            let first = index as i64 * TILE_WIDTH as i64;
            // Only leaves under the latest checkpoint are published.
            let rows = client
                .query(
                    "SELECT l.leaf FROM seal_ledger l, snapshot_log_head h
                      WHERE l.leaf_index >= $1 AND l.leaf_index < $2 AND l.leaf_index < h.tree_size
                      ORDER BY l.leaf_index",
                    &[&first, &(first + want)],
                )
                .await?;
            if rows.len() as i64 != want {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(rows.len() * 34);
            for r in &rows {
                let leaf: &[u8] = r.get(0);
                out.extend_from_slice(&(leaf.len() as u16).to_be_bytes());
                out.extend_from_slice(leaf);
            }
            Ok(Some(out))
        }
    }
}

/// A consistency proof between two checkpoints of the log, from tiles.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyProof {
    pub format: String,
    pub old_size: u64,
    pub new_size: u64,
    /// The signed checkpoints of both sizes.
    pub old_checkpoint: String,
    pub new_checkpoint: String,
    /// RFC 9162 consistency proof, hex nodes in order.
    pub proof: Vec<String>,
}

/// The consistency proof from the checkpoint of `old_size` to the one of
/// `new_size` (default: the latest), computed from O(log n) tiles.
pub async fn consistency(
    client: &impl GenericClient,
    old_size: u64,
    new_size: Option<u64>,
) -> Result<ConsistencyProof, SnapshotError> {
    let note_of = |size: i64| async move {
        client
            .query_opt(
                "SELECT checkpoint_note FROM snapshots WHERE tree_size = $1 ORDER BY id LIMIT 1",
                &[&size],
            )
            .await
            .map(|r| r.map(|r| r.get::<_, String>(0)))
    };
    let new_size = match new_size {
        Some(n) => n,
        None => client
            .query_one("SELECT tree_size FROM snapshot_log_head", &[])
            .await?
            .get::<_, i64>(0) as u64,
    };
    let missing = |size: u64| {
        SnapshotError::BadRequest(format!(
            "no checkpoint has tree size {size}: give the sizes of published checkpoints"
        ))
    };
    let old_note = note_of(old_size as i64)
        .await?
        .ok_or_else(|| missing(old_size))?;
    let new_note = note_of(new_size as i64)
        .await?
        .ok_or_else(|| missing(new_size))?;
    let ranges = merkle::consistency_proof_ranges(old_size, new_size)
        .map_err(|e| SnapshotError::BadRequest(e.to_string()))?;
    let nodes = range_hashes(client, &ranges).await?.ok_or_else(|| {
        SnapshotError::Integrity(
            "the stored tiles do not reach this size: run a snapshot (it tiles the log)".into(),
        )
    })?;
    Ok(ConsistencyProof {
        format: "audit-worker.consistency-proof.v1".into(),
        old_size,
        new_size,
        old_checkpoint: old_note,
        new_checkpoint: new_note,
        proof: nodes.iter().map(hex::encode).collect(),
    })
}
