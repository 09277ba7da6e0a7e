//! Merkle computations fed by streaming leaves out of PostgreSQL.
//!
//! The pure code in [`crate::integrity::merkle`] describes proofs as node
//! ranges; this module computes those nodes by reading the seal ledger in
//! leaf order through a server-side portal, one page at a time, so memory
//! stays flat whatever the size of the log.

use std::ops::Range;

use tokio_postgres::{Row, Transaction};

use crate::integrity::merkle::{self, Hash, TreeBuilder};

/// Reads a query's rows page by page through a portal (a server-side
/// cursor), so a query over millions of rows never sits in memory at once.
/// Must be used inside a transaction, which owns the portal.
pub struct PagedRows<'t, 'c> {
    tx: &'t Transaction<'c>,
    portal: tokio_postgres::Portal,
    page: i32,
    buffer: std::collections::VecDeque<Row>,
    done: bool,
}

impl<'t, 'c> PagedRows<'t, 'c> {
    /// Binds `sql` with `params` to a new portal in `tx`.
    pub async fn open(
        tx: &'t Transaction<'c>,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        page: i32,
    ) -> Result<Self, tokio_postgres::Error> {
        let portal = tx.bind(sql, params).await?;
        Ok(Self {
            tx,
            portal,
            page: page.max(1),
            buffer: Default::default(),
            done: false,
        })
    }

    /// The next row without consuming it.
    pub async fn peek(&mut self) -> Result<Option<&Row>, tokio_postgres::Error> {
        if self.buffer.is_empty() && !self.done {
            let rows = self.tx.query_portal(&self.portal, self.page).await?;
            if rows.len() < self.page as usize {
                self.done = true;
            }
            self.buffer.extend(rows);
        }
        Ok(self.buffer.front())
    }

    /// The next row.
    pub async fn next(&mut self) -> Result<Option<Row>, tokio_postgres::Error> {
        self.peek().await?;
        Ok(self.buffer.pop_front())
    }

    /// The next page of rows (empty at the end).
    pub async fn next_page(&mut self) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.peek().await?;
        Ok(self.buffer.drain(..).collect())
    }
}

/// Computes the nodes `MTH(D[r])` of several disjoint leaf ranges from one
/// in-order pass over the leaves.
#[derive(Debug)]
pub struct RangeHasher {
    ranges: Vec<(Range<u64>, TreeBuilder)>,
}

impl RangeHasher {
    /// Prepares a builder for each range (as produced by
    /// `inclusion_proof_ranges` or `consistency_proof_ranges`).
    pub fn new(ranges: Vec<Range<u64>>) -> Self {
        Self {
            ranges: ranges
                .into_iter()
                .map(|r| (r, TreeBuilder::new()))
                .collect(),
        }
    }

    /// Feeds leaf `index`'s leaf hash to the range containing it, if any.
    pub fn feed(&mut self, index: u64, leaf_hash: &Hash) {
        for (r, b) in &mut self.ranges {
            if r.contains(&index) {
                b.push(*leaf_hash);
            }
        }
    }

    /// Smallest leaf index any range needs (for starting the stream there).
    pub fn start(&self) -> Option<u64> {
        self.ranges.iter().map(|(r, _)| r.start).min()
    }

    /// The nodes, in the ranges' order; `None` if a range was not fully fed.
    pub fn finish(self) -> Option<Vec<Hash>> {
        self.ranges
            .into_iter()
            .map(|(r, b)| (b.size() == r.end - r.start).then(|| b.root()))
            .collect()
    }
}

/// The leaf ranges of a tree's frontier (its perfect subtrees on the right
/// edge, largest first), matching [`TreeBuilder::frontier`] element by element.
pub fn frontier_ranges(size: u64) -> Vec<Range<u64>> {
    let mut start = 0;
    let mut out = Vec::new();
    for bit in (0..64).rev() {
        let width = 1u64 << bit;
        if size & width != 0 {
            out.push(start..start + width);
            start += width;
        }
    }
    out
}

/// One node of a proof plan: its leaf range, and its hash when already known.
pub type ProofNode = (Range<u64>, Option<Hash>);

/// Splits a consistency proof's ranges into nodes taken from the old tree's
/// frontier and ranges over new leaves only.
///
/// Every node of an RFC 6962 consistency proof from `old` to `new` either is
/// a perfect subtree on the old tree's right edge (a frontier element we
/// stored with the old checkpoint) or lies wholly in `old..new`, so a
/// snapshot computes its proof from the leaves it appends alone, never
/// re-reading the log. Returns for each range either its known node or
/// `None` (to be computed), or an error if a range straddles the boundary
/// (which the RFC 6962 structure rules out).
pub fn consistency_plan(
    old_size: u64,
    new_size: u64,
    old_frontier: &[Hash],
) -> Result<Vec<ProofNode>, String> {
    let ranges = merkle::consistency_proof_ranges(old_size, new_size).map_err(|e| e.to_string())?;
    let known: Vec<(Range<u64>, Hash)> = frontier_ranges(old_size)
        .into_iter()
        .zip(old_frontier.iter().copied())
        .collect();
    ranges
        .into_iter()
        .map(|r| {
            if r.start >= old_size {
                Ok((r, None))
            } else if let Some((_, h)) = known.iter().find(|(k, _)| *k == r) {
                Ok((r, Some(*h)))
            } else {
                Err(format!(
                    "consistency node {r:?} is neither an old frontier node nor new (old size {old_size})"
                ))
            }
        })
        .collect()
}

/// Converts a 32-byte column value into a hash, naming what was wrong.
pub fn hash_from_bytes(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::merkle::{consistency_proof, leaf_hash, verify_consistency};

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn frontier_ranges_match_the_builder_frontier() {
        for n in 0..70u64 {
            let all = leaves(n);
            let mut b = TreeBuilder::new();
            b.extend(all.iter().copied());
            let ranges = frontier_ranges(n);
            assert_eq!(ranges.len(), b.frontier().len());
            for (r, h) in ranges.iter().zip(b.frontier()) {
                let sub =
                    merkle::subtree_root(all[r.start as usize..r.end as usize].iter().copied());
                assert_eq!(&sub, h, "n={n} r={r:?}");
            }
        }
    }

    #[test]
    fn consistency_proofs_from_frontier_and_new_leaves_equal_the_in_memory_ones() {
        for new in 1..40u64 {
            let all = leaves(new);
            for old in 0..=new {
                let mut ob = TreeBuilder::new();
                ob.extend(all[..old as usize].iter().copied());
                let plan = consistency_plan(old, new, ob.frontier()).unwrap();
                let mut pending: Vec<Range<u64>> = Vec::new();
                for (r, h) in &plan {
                    if h.is_none() {
                        pending.push(r.clone());
                    }
                }
                let mut hasher = RangeHasher::new(pending);
                for i in old..new {
                    hasher.feed(i, &all[i as usize]);
                }
                let mut computed = hasher.finish().unwrap().into_iter();
                let proof: Vec<Hash> = plan
                    .iter()
                    .map(|(_, h)| h.unwrap_or_else(|| computed.next().unwrap()))
                    .collect();
                assert_eq!(proof, consistency_proof(&all, old, new).unwrap());
                let mut nb = TreeBuilder::new();
                nb.extend(all.iter().copied());
                verify_consistency(old, new, &ob.root(), &nb.root(), &proof).unwrap();
            }
        }
    }
}
