//! C2SP tlog-tiles: the tree's hashes stored as tiles of 256, so any node
//! of the tree (and so any inclusion or consistency proof) is read from
//! O(log n) tiles instead of re-hashing leaves.
//!
//! A tile at level `L`, index `N` holds the hashes of the complete subtrees
//! of height `8 * L` with indices `256 * N ..`, in order: level 0 holds the
//! leaf hashes, level 1 the roots of 256-leaf subtrees, and so on. A tile
//! with fewer than 256 hashes is partial; it only ever grows (a partial
//! tile of width W is a prefix of every later version). Pure code: the
//! caller loads and stores tiles.

use std::collections::BTreeMap;
use std::ops::Range;

use super::merkle::{node_hash, subtree_root, Hash};

/// Hashes per full tile.
pub const TILE_WIDTH: u64 = 256;
/// Tree levels per tile level (256 = 2^8).
pub const TILE_HEIGHT: u32 = 8;

/// One tile as stored: its coordinates and its hashes (1..=256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub level: u32,
    pub index: u64,
    pub hashes: Vec<Hash>,
}

/// The tiles to write after appending `new_leaves` (leaf hashes) to a tree
/// of `old_size` leaves. `partial(level, index)` returns the stored hashes
/// of a tile that was partial at `old_size` (the caller loads at most one
/// per level). Fails when a stored partial tile is missing or has the
/// wrong width.
pub fn tiles_to_write(
    old_size: u64,
    new_leaves: &[Hash],
    partial: &dyn Fn(u32, u64) -> Option<Vec<Hash>>,
) -> Result<Vec<Tile>, String> {
    let mut out = Vec::new();
    let mut level = 0u32;
    let mut start = old_size; // complete nodes at this level before the append
    let mut fresh: Vec<Hash> = new_leaves.to_vec();
    while !fresh.is_empty() {
        let end = start + fresh.len() as u64;
        let first = start / TILE_WIDTH;
        let last = (end - 1) / TILE_WIDTH;
        let mut written: BTreeMap<u64, usize> = BTreeMap::new();
        for t in first..=last {
            let lo = start.max(t * TILE_WIDTH);
            let hi = end.min((t + 1) * TILE_WIDTH);
            let mut hashes = if lo > t * TILE_WIDTH {
                let have = partial(level, t).ok_or_else(|| {
                    format!("tile {level}/{t} is missing: the stored tiles do not reach size {old_size}")
                })?;
                if have.len() as u64 != lo - t * TILE_WIDTH {
                    return Err(format!(
                        "tile {level}/{t} holds {} hashes, expected {}",
                        have.len(),
                        lo - t * TILE_WIDTH
                    ));
                }
                have
            } else {
                Vec::new()
            };
            hashes.extend_from_slice(&fresh[(lo - start) as usize..(hi - start) as usize]);
            written.insert(t, out.len());
            out.push(Tile {
                level,
                index: t,
                hashes,
            });
        }
        // Tiles that became full give the next level's new nodes.
        let (next_start, next_end) = (start / TILE_WIDTH, end / TILE_WIDTH);
        fresh = (next_start..next_end)
            .map(|j| subtree_root(out[written[&j]].hashes.iter().copied()))
            .collect();
        start = next_start;
        level += 1;
    }
    Ok(out)
}

/// A perfect subtree: `2^height` leaves starting at leaf `index << height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub height: u32,
    pub index: u64,
}

impl Node {
    /// The tile holding the hashes this node is computed from, and the
    /// positions in it: the node itself when its height is a multiple of
    /// 8, else the 2^(height mod 8) nodes below it at the tile's level.
    pub fn tile_span(&self) -> (u32, u64, Range<usize>) {
        let level = self.height / TILE_HEIGHT;
        let r = self.height % TILE_HEIGHT;
        let first = self.index << r; // index at height 8 * level
        let tile = first / TILE_WIDTH;
        let at = (first % TILE_WIDTH) as usize;
        (level, tile, at..at + (1usize << r))
    }
}

/// The perfect subtrees whose roots give `MTH(D[range])`, left to right
/// (RFC 6962 splits at the largest power of two below the size).
pub fn range_nodes(range: Range<u64>) -> Vec<Node> {
    let mut out = Vec::new();
    let (mut lo, hi) = (range.start, range.end);
    while lo < hi {
        let n = hi - lo;
        // Largest power of two <= n that keeps the block aligned at lo.
        let mut h = 63 - n.leading_zeros();
        while lo % (1u64 << h) != 0 {
            h -= 1;
        }
        out.push(Node {
            height: h,
            index: lo >> h,
        });
        lo += 1u64 << h;
    }
    out
}

/// `MTH(D[range])` from the roots of [`range_nodes`] (folded right to
/// left, which is RFC 6962's split for ranges that start on a power-of-two
/// boundary of their size, as proof ranges do).
pub fn fold_nodes(roots: &[Hash]) -> Option<Hash> {
    let mut it = roots.iter().rev();
    let mut acc = *it.next()?;
    for left in it {
        acc = node_hash(left, &acc);
    }
    Some(acc)
}

/// The hash of a node from its tile's hashes (see [`Node::tile_span`]).
pub fn node_from_tile(node: &Node, tile_hashes: &[Hash]) -> Option<Hash> {
    let (_, _, span) = node.tile_span();
    let slice = tile_hashes.get(span)?;
    Some(subtree_root(slice.iter().copied()))
}

/// A tile index as a tlog-tiles path: groups of three digits, all but the
/// last prefixed with `x` (1234067 -> `x001/x234/067`).
pub fn index_path(n: u64) -> String {
    let digits = format!("{n}");
    let pad = (3 - digits.len() % 3) % 3;
    let digits = format!("{}{digits}", "0".repeat(pad));
    let groups: Vec<&str> = (0..digits.len() / 3)
        .map(|i| &digits[3 * i..3 * i + 3])
        .collect();
    let (last, rest) = groups.split_last().expect("at least one group");
    rest.iter()
        .map(|g| format!("x{g}/"))
        .chain(std::iter::once(last.to_string()))
        .collect()
}

/// What a `/tile/...` path (after `tile/`) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TileRequest {
    /// Hashes of tile (level, index), all 256 or the first `width`.
    Hashes {
        level: u32,
        index: u64,
        width: Option<u64>,
    },
    /// The entry bundle of leaves `256 * index ..`, all 256 or `width`.
    Entries { index: u64, width: Option<u64> },
}

/// Parses `<L>/<N>[.p/<W>]` or `entries/<N>[.p/<W>]`; `None` for anything
/// else (non-canonical paths included, so each tile has one address).
pub fn parse_tile_path(path: &str) -> Option<TileRequest> {
    let (head, rest) = path.split_once('/')?;
    let (index_part, width) = match rest.rsplit_once(".p/") {
        Some((i, w)) => {
            let w: u64 = w.parse().ok()?;
            if !(1..TILE_WIDTH).contains(&w) || w.to_string() != rest.rsplit_once(".p/")?.1 {
                return None;
            }
            (i, Some(w))
        }
        None => (rest, None),
    };
    let groups: Vec<&str> = index_part.split('/').collect();
    let mut n: u64 = 0;
    for (i, g) in groups.iter().enumerate() {
        let digits = if i + 1 < groups.len() {
            g.strip_prefix('x')?
        } else {
            g
        };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n = n
            .checked_mul(1000)?
            .checked_add(digits.parse::<u64>().ok()?)?;
    }
    if index_path(n) != index_part {
        return None;
    }
    if head == "entries" {
        return Some(TileRequest::Entries { index: n, width });
    }
    let level: u32 = head.parse().ok()?;
    if level.to_string() != head || level > 63 {
        return None;
    }
    Some(TileRequest::Hashes {
        level,
        index: n,
        width,
    })
}

/// How many hashes tile (level, index) holds at tree size `size`.
pub fn width_at(level: u32, index: u64, size: u64) -> u64 {
    let nodes = if level * TILE_HEIGHT >= 64 {
        0
    } else {
        size >> (level * TILE_HEIGHT)
    };
    nodes.saturating_sub(index * TILE_WIDTH).min(TILE_WIDTH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::merkle::{
        consistency_proof, consistency_proof_ranges, inclusion_proof, inclusion_proof_ranges,
        leaf_hash,
    };
    use std::collections::HashMap;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// Appends in uneven steps and keeps the latest version of each tile.
    type Store = HashMap<(u32, u64), Vec<Hash>>;

    fn build(sizes: &[u64]) -> (Vec<Hash>, Store) {
        let all = leaves(*sizes.last().unwrap());
        let mut store: Store = HashMap::new();
        let mut old = 0u64;
        for &size in sizes {
            let snapshot = store.clone();
            let tiles = tiles_to_write(old, &all[old as usize..size as usize], &|l, i| {
                snapshot.get(&(l, i)).cloned()
            })
            .unwrap();
            for t in tiles {
                if let Some(prev) = store.get(&(t.level, t.index)) {
                    assert!(t.hashes.starts_with(prev), "tiles only grow");
                }
                store.insert((t.level, t.index), t.hashes);
            }
            old = size;
        }
        (all, store)
    }

    fn node(store: &Store, n: &Node) -> Hash {
        let (level, tile, _) = n.tile_span();
        node_from_tile(n, &store[&(level, tile)]).unwrap()
    }

    #[test]
    fn proofs_from_tiles_equal_proofs_from_leaves() {
        let (all, store) = build(&[1, 255, 256, 300, 65_535, 65_536, 70_001]);
        let size = all.len() as u64;
        assert_eq!(store[&(0, 0)].len(), 256);
        assert_eq!(store[&(1, 0)].len(), 256);
        assert_eq!(store[&(2, 0)].len(), 1);
        assert_eq!(store[&(1, 1)].len(), (70_001 / 256 - 256) as usize);
        for index in [0, 1, 255, 256, 65_535, 65_536, 70_000] {
            let want = inclusion_proof(&all, index).unwrap();
            let got: Vec<Hash> = inclusion_proof_ranges(index, size)
                .unwrap()
                .into_iter()
                .map(|r| {
                    let roots: Vec<Hash> = range_nodes(r).iter().map(|n| node(&store, n)).collect();
                    fold_nodes(&roots).unwrap()
                })
                .collect();
            assert_eq!(got, want, "inclusion of {index}");
        }
        for old in [1, 255, 256, 257, 65_536, 69_999] {
            let want = consistency_proof(&all, old, size).unwrap();
            let got: Vec<Hash> = consistency_proof_ranges(old, size)
                .unwrap()
                .into_iter()
                .map(|r| {
                    let roots: Vec<Hash> = range_nodes(r).iter().map(|n| node(&store, n)).collect();
                    fold_nodes(&roots).unwrap()
                })
                .collect();
            assert_eq!(got, want, "consistency from {old}");
        }
        // The root itself, from tiles.
        let roots: Vec<Hash> = range_nodes(0..size)
            .iter()
            .map(|n| node(&store, n))
            .collect();
        assert_eq!(
            fold_nodes(&roots).unwrap(),
            subtree_root(all.iter().copied())
        );
        assert_eq!(width_at(0, 272, size), 256);
        assert_eq!(width_at(0, 273, size), 70_001 - 273 * 256);
        assert_eq!(width_at(0, 273, 69_900), 69_900 - 273 * 256);
        assert_eq!(width_at(1, 1, size), 273 - 256);
        assert_eq!(width_at(2, 0, size), 1);
        assert_eq!(width_at(3, 0, size), 0);
    }

    #[test]
    fn a_missing_or_wrong_partial_tile_is_an_error() {
        let l = leaves(10);
        assert!(tiles_to_write(5, &l[5..], &|_, _| None).is_err());
        assert!(tiles_to_write(5, &l[5..], &|_, _| Some(l[..4].to_vec())).is_err());
        assert_eq!(
            tiles_to_write(5, &l[5..], &|_, _| Some(l[..5].to_vec())).unwrap()[0].hashes,
            l
        );
    }

    #[test]
    fn tile_paths_follow_the_tlog_tiles_encoding() {
        assert_eq!(index_path(0), "000");
        assert_eq!(index_path(1234067), "x001/x234/067");
        assert_eq!(index_path(999), "999");
        assert_eq!(index_path(1000), "x001/000");
        assert_eq!(
            parse_tile_path("0/x001/x234/067"),
            Some(TileRequest::Hashes {
                level: 0,
                index: 1234067,
                width: None
            })
        );
        assert_eq!(
            parse_tile_path("2/005.p/17"),
            Some(TileRequest::Hashes {
                level: 2,
                index: 5,
                width: Some(17)
            })
        );
        assert_eq!(
            parse_tile_path("entries/x001/000.p/255"),
            Some(TileRequest::Entries {
                index: 1000,
                width: Some(255)
            })
        );
        for bad in [
            "0/5",
            "0/0005",
            "0/x000/005",
            "0/005.p/0",
            "0/005.p/256",
            "0/005.p/07",
            "00/005",
            "e/005",
            "0/x01/005",
            "0/005/",
            "0",
            "0/-05",
            "64/000",
        ] {
            assert_eq!(parse_tile_path(bad), None, "{bad}");
        }
    }
}
