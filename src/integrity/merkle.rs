//! RFC 6962 / RFC 9162 Merkle tree hashing for the snapshot log.
//!
//! Every snapshotted event becomes one leaf of a single append-only log
//! (see README "Snapshots"). This module is pure: it hashes, builds roots in
//! streaming fashion, describes proofs as lists of node ranges (so the I/O
//! layer can compute each node by streaming leaf hashes out of the database)
//! and verifies proofs. Nothing here performs I/O.
//!
//! Terminology: `MTH(D[a..b])` is the Merkle tree hash of the leaves with
//! indices `a..b`; a proof is a list of such nodes, expressed as ranges.

use std::ops::Range;

use sha2::{Digest, Sha256};

/// A SHA-256 digest; used for leaf hashes, interior nodes and roots alike.
pub type Hash = [u8; 32];

/// Domain-separation prefix for leaves (RFC 6962 section 2.1), so that a leaf
/// can never be confused with an interior node.
const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix for interior nodes (RFC 6962 section 2.1).
const NODE_PREFIX: u8 = 0x01;

/// Why a proof could not be produced or did not verify.
///
/// Separate variants let the caller tell a caller bug (bad index or sizes)
/// from evidence of tampering (a root mismatch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not inside a tree of that size (this includes every
    /// index of the empty tree).
    #[error("leaf index {index} is out of range for tree size {size}")]
    IndexOutOfRange {
        /// The requested leaf index.
        index: u64,
        /// The tree size it was checked against.
        size: u64,
    },
    /// A consistency proof was asked for a tree that shrank.
    #[error("new tree size {new_size} is smaller than old tree size {old_size}")]
    SizeDecreased {
        /// Size of the older tree.
        old_size: u64,
        /// Size of the newer tree.
        new_size: u64,
    },
    /// The in-memory helpers were given fewer leaves than the tree size needs.
    #[error("tree size {size} needs more leaves than the {available} available")]
    NotEnoughLeaves {
        /// The tree size requested.
        size: u64,
        /// How many leaf hashes were supplied.
        available: u64,
    },
    /// The proof has the wrong number of nodes for these indices and sizes.
    #[error("proof has {got} nodes, expected {expected}")]
    WrongProofLength {
        /// The length the proof must have.
        expected: u64,
        /// The length it has.
        got: u64,
    },
    /// The inclusion proof does not lead to the expected root.
    #[error("inclusion proof does not match the root hash")]
    RootMismatch,
    /// The consistency proof does not reproduce the old root.
    #[error("consistency proof does not match the old root hash")]
    OldRootMismatch,
    /// The consistency proof does not reproduce the new root.
    #[error("consistency proof does not match the new root hash")]
    NewRootMismatch,
}

/// A stored frontier could not be turned back into a [`TreeBuilder`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a tree of size {size} has a frontier of {expected} hashes, got {got}")]
pub struct FrontierError {
    /// The tree size claimed for the frontier.
    pub size: u64,
    /// The number of hashes such a frontier has (popcount of `size`).
    pub expected: u32,
    /// The number of hashes supplied.
    pub got: usize,
}

/// Hashes one leaf's data (RFC 6962: `SHA-256(0x00 || data)`); for the audit
/// log, `data` is the event's 32-byte canonical hash.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(data);
    h.finalize().into()
}

/// Hashes two child nodes into their parent (RFC 6962:
/// `SHA-256(0x01 || left || right)`).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty tree (`SHA-256("")`), which RFC 6962 defines specially.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Largest power of two strictly less than `n`: the RFC 6962 split point.
/// Callers guarantee `n >= 2`.
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Streaming Merkle root builder with O(log n) memory.
///
/// It keeps the "frontier": the roots of the perfect subtrees on the right
/// edge of the tree, largest (leftmost) first, one per set bit of the size.
/// This is what lets the log be extended snapshot by snapshot: store
/// [`TreeBuilder::frontier`] with each checkpoint and resume with
/// [`TreeBuilder::from_frontier`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeBuilder {
    size: u64,
    frontier: Vec<Hash>,
}

impl TreeBuilder {
    /// Starts an empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resumes a tree of `size` leaves from its stored frontier (perfect
    /// subtree roots, largest first, as returned by [`TreeBuilder::frontier`]).
    ///
    /// Only the number of hashes can be checked here; whether they are the
    /// right ones is established by comparing [`TreeBuilder::root`] with the
    /// last signed checkpoint.
    pub fn from_frontier(size: u64, frontier: Vec<Hash>) -> Result<Self, FrontierError> {
        let expected = size.count_ones();
        if frontier.len() != expected as usize {
            return Err(FrontierError {
                size,
                expected,
                got: frontier.len(),
            });
        }
        Ok(Self { size, frontier })
    }

    /// Appends the next leaf hash (already passed through [`leaf_hash`]).
    ///
    /// # Panics
    ///
    /// Panics if the tree already holds `u64::MAX` leaves, which cannot happen
    /// by appending (it would take centuries) and can only come from a
    /// frontier claiming that size.
    pub fn push(&mut self, leaf_hash: Hash) {
        let new_size = self
            .size
            .checked_add(1)
            .expect("Merkle tree size overflowed u64");
        let mut hash = leaf_hash;
        let mut n = self.size;
        // Each trailing one bit of the old size is a perfect subtree of the
        // same height as `hash`: merge them.
        while n & 1 == 1 {
            let left = self
                .frontier
                .pop()
                .expect("frontier length equals popcount(size)");
            hash = node_hash(&left, &hash);
            n >>= 1;
        }
        self.frontier.push(hash);
        self.size = new_size;
    }

    /// Number of leaves appended so far (including those behind a frontier).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Current root, `MTH(D[0..size])`; cheap enough to call at any time.
    pub fn root(&self) -> Hash {
        let mut iter = self.frontier.iter().rev();
        match iter.next() {
            None => empty_root(),
            Some(last) => iter.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }

    /// The compact state to store so the log can be resumed later.
    pub fn frontier(&self) -> &[Hash] {
        &self.frontier
    }
}

impl Extend<Hash> for TreeBuilder {
    /// Pushes leaf hashes in order, as repeated [`TreeBuilder::push`].
    fn extend<I: IntoIterator<Item = Hash>>(&mut self, iter: I) {
        for h in iter {
            self.push(h);
        }
    }
}

/// Merkle tree hash of a run of leaf hashes, `MTH(D[start..end])` when fed
/// the leaf hashes of that range; the I/O layer uses it to compute each
/// proof node by streaming leaf hashes.
pub fn subtree_root(leaf_hashes: impl IntoIterator<Item = Hash>) -> Hash {
    let mut b = TreeBuilder::new();
    b.extend(leaf_hashes);
    b.root()
}

/// Node ranges of the audit path for leaf `index` in a tree of `size` leaves
/// (RFC 6962 section 2.1.1), ordered from the leaf's sibling up to the
/// root's child, as [`verify_inclusion`] expects.
pub fn inclusion_proof_ranges(index: u64, size: u64) -> Result<Vec<Range<u64>>, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut siblings = Vec::new();
    let (mut lo, mut n, mut m) = (0u64, size, index);
    while n > 1 {
        let k = split_point(n);
        if m < k {
            siblings.push(lo + k..lo + n);
            n = k;
        } else {
            siblings.push(lo..lo + k);
            lo += k;
            m -= k;
            n -= k;
        }
    }
    siblings.reverse();
    Ok(siblings)
}

/// Node ranges of the consistency proof from a tree of `old_size` leaves to
/// one of `new_size` leaves (RFC 6962 section 2.1.2), in the order
/// [`verify_consistency`] expects. The proof is empty when `old_size` is 0
/// or equals `new_size`.
pub fn consistency_proof_ranges(
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Range<u64>>, ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizeDecreased { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    // Iterative SUBPROOF(m, D[lo..lo+n], b): walk down, collecting siblings.
    let mut siblings = Vec::new();
    let (mut lo, mut n, mut m, mut whole_old_tree) = (0u64, new_size, old_size, true);
    let mut bottom = None;
    loop {
        if m == n {
            if !whole_old_tree {
                bottom = Some(lo..lo + n);
            }
            break;
        }
        let k = split_point(n);
        if m <= k {
            siblings.push(lo + k..lo + n);
            n = k;
        } else {
            siblings.push(lo..lo + k);
            lo += k;
            m -= k;
            n -= k;
            whole_old_tree = false;
        }
    }
    Ok(bottom
        .into_iter()
        .chain(siblings.into_iter().rev())
        .collect())
}

/// Computes each range's node from an in-memory list of leaf hashes.
fn hashes_for_ranges(leaves: &[Hash], ranges: Vec<Range<u64>>) -> Vec<Hash> {
    ranges
        .into_iter()
        // Ranges come from the proof functions with sizes <= leaves.len(),
        // so the casts and slicing are in bounds.
        .map(|r| subtree_root(leaves[r.start as usize..r.end as usize].iter().copied()))
        .collect()
}

/// In-memory inclusion proof for `leaves[index]` in the tree of all
/// `leaves` (leaf hashes); for tests and small logs.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, ProofError> {
    let ranges = inclusion_proof_ranges(index, leaves.len() as u64)?;
    Ok(hashes_for_ranges(leaves, ranges))
}

/// In-memory consistency proof between the trees of the first `old_size`
/// and first `new_size` of `leaves` (leaf hashes); for tests and small logs.
pub fn consistency_proof(
    leaves: &[Hash],
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProofError> {
    let available = leaves.len() as u64;
    if new_size > available {
        return Err(ProofError::NotEnoughLeaves {
            size: new_size,
            available,
        });
    }
    let ranges = consistency_proof_ranges(old_size, new_size)?;
    Ok(hashes_for_ranges(leaves, ranges))
}

/// Number of nodes in the inclusion proof of `index` in a tree of `size`
/// (`index < size`): the inner part below the point where the paths of
/// `index` and `size - 1` diverge, plus one node per left-hand border subtree.
fn inclusion_proof_len(index: u64, size: u64) -> (u32, u32) {
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner, border)
}

/// Shifts `fn_`/`sn` right together until `fn_` is odd or zero (RFC 9162).
fn shift_until_odd(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// Checks that leaf hash `leaf_hash` sits at `index` in the tree of `size`
/// leaves whose root is `root` (RFC 9162 section 2.1.3.2). Never panics,
/// whatever the input.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (inner, border) = inclusion_proof_len(index, size);
    let expected = u64::from(inner + border);
    if proof.len() as u64 != expected {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len() as u64,
        });
    }

    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::RootMismatch);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                shift_until_odd(&mut fn_, &mut sn);
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn == 0 && r == *root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Checks that the tree of `new_size` leaves with root `new_root` extends
/// the tree of `old_size` leaves with root `old_root` (RFC 9162 section
/// 2.1.4.2). Never panics, whatever the input.
///
/// Edge cases: equal sizes need an empty proof and equal roots; an old size
/// of 0 needs an empty proof and `old_root` equal to [`empty_root`] (any new
/// tree extends the empty one, so `new_root` is not constrained).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizeDecreased { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongProofLength {
                expected: 0,
                got: proof.len() as u64,
            });
        }
        if old_size == 0 {
            return if *old_root == empty_root() {
                Ok(())
            } else {
                Err(ProofError::OldRootMismatch)
            };
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::NewRootMismatch)
        };
    }

    // 0 < old_size < new_size from here on.
    let old_is_pow2 = old_size.is_power_of_two();
    let (inner, border) = inclusion_proof_len(old_size - 1, new_size);
    let shift = old_size.trailing_zeros();
    let expected = u64::from(inner - shift + border) + u64::from(!old_is_pow2);
    if proof.len() as u64 != expected {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len() as u64,
        });
    }

    // RFC 9162 2.1.4.2 step 2: a power-of-two old tree is itself a node on
    // the path, so its root seeds the computation.
    let (seed, rest) = if old_is_pow2 {
        (old_root, proof)
    } else {
        match proof.split_first() {
            Some((first, rest)) => (first, rest),
            None => return Err(ProofError::OldRootMismatch),
        }
    };

    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::NewRootMismatch);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                shift_until_odd(&mut fn_, &mut sn);
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if sn != 0 || sr != *new_root {
        return Err(ProofError::NewRootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VECTORS: &str = include_str!("../../tests/fixtures/integrity-vectors.json");

    fn fixture() -> serde_json::Value {
        serde_json::from_str(VECTORS).expect("fixture is valid JSON")
    }

    fn hex_list(v: &serde_json::Value) -> Vec<Vec<u8>> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| hex::decode(s.as_str().expect("string")).expect("hex"))
            .collect()
    }

    fn to_hash(b: &[u8]) -> Hash {
        b.try_into().expect("32 bytes")
    }

    /// The recursive RFC 6962 definition, as the reference implementation.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// The recursive RFC 6962 PATH definition.
    fn path_ref(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split_point(n as u64) as usize;
        if m < k {
            let mut p = path_ref(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path_ref(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    /// The recursive RFC 6962 SUBPROOF definition.
    fn subproof_ref(m: usize, leaves: &[Hash], b: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if b { Vec::new() } else { vec![mth(leaves)] };
        }
        let k = split_point(n as u64) as usize;
        if m <= k {
            let mut p = subproof_ref(m, &leaves[..k], b);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = subproof_ref(m - k, &leaves[k..], false);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    /// Which side each audit-path sibling is on (true = right of the leaf).
    /// The verifier's computation depends only on this, so two sizes with
    /// the same shape accept the same proofs.
    fn inclusion_shape(index: u64, size: u64) -> Option<Vec<bool>> {
        let ranges = inclusion_proof_ranges(index, size).ok()?;
        Some(ranges.iter().map(|r| r.start > index).collect())
    }

    /// Like [`inclusion_shape`] for consistency proofs of `0 < m < n`: whether
    /// the old root seeds the computation, and the side of every other node
    /// relative to leaf `m - 1`.
    fn consistency_shape(m: u64, n: u64) -> Option<(bool, Vec<bool>)> {
        if m == 0 || m >= n {
            return None;
        }
        let ranges = consistency_proof_ranges(m, n).ok()?;
        let seeded_by_old_root = m.is_power_of_two();
        let skip = usize::from(!seeded_by_old_root);
        let sides = ranges[skip..].iter().map(|r| r.start >= m).collect();
        Some((seeded_by_old_root, sides))
    }

    #[test]
    fn proofs_do_not_bind_the_tree_size() {
        // Documented limitation of RFC 6962 proofs: the size must come from a
        // signed checkpoint. Index 0 of a 3-leaf tree has the same audit path
        // shape as index 0 of a 4-leaf tree.
        let leaves = synthetic_leaves(3);
        let proof = inclusion_proof(&leaves, 0).unwrap();
        let root = mth(&leaves);
        assert!(verify_inclusion(&leaves[0], 0, 3, &proof, &root).is_ok());
        assert!(verify_inclusion(&leaves[0], 0, 4, &proof, &root).is_ok());
        let leaves = synthetic_leaves(8);
        let proof = consistency_proof(&leaves, 4, 8).unwrap();
        let (old, new) = (mth(&leaves[..4]), mth(&leaves));
        assert!(verify_consistency(4, 8, &old, &new, &proof).is_ok());
        assert!(verify_consistency(4, 5, &old, &new, &proof).is_ok());
    }

    fn fixture_leaves() -> Vec<Hash> {
        let f = fixture();
        hex_list(&f["rfc6962"]["leafInputsHex"])
            .iter()
            .map(|d| leaf_hash(d))
            .collect()
    }

    fn synthetic_leaves(n: usize) -> Vec<Hash> {
        (0..n as u64).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn fixture_leaf_hashes() {
        let f = fixture();
        let expected = hex_list(&f["rfc6962"]["leafHashesHex"]);
        let got = fixture_leaves();
        assert_eq!(expected.len(), 8);
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.as_slice(), e.as_slice());
        }
    }

    #[test]
    fn fixture_roots_for_every_size() {
        let f = fixture();
        let roots = hex_list(&f["rfc6962"]["rootHashesBySizeHex"]);
        let leaves = fixture_leaves();
        assert_eq!(roots.len(), 9);
        let mut builder = TreeBuilder::new();
        for (n, expected) in roots.iter().enumerate() {
            let expected = to_hash(expected);
            assert_eq!(builder.size(), n as u64);
            assert_eq!(builder.root(), expected, "builder, size {n}");
            assert_eq!(mth(&leaves[..n]), expected, "recursive, size {n}");
            assert_eq!(subtree_root(leaves[..n].iter().copied()), expected);
            if n < leaves.len() {
                builder.push(leaves[n]);
            }
        }
    }

    #[test]
    fn empty_tree_root_is_sha256_of_nothing() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(TreeBuilder::new().root(), empty_root());
        assert_eq!(subtree_root(std::iter::empty()), empty_root());
    }

    #[test]
    fn split_point_is_largest_power_of_two_below() {
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(3), 2);
        assert_eq!(split_point(4), 2);
        assert_eq!(split_point(5), 4);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
        assert_eq!(split_point(u64::MAX), 1 << 63);
        assert_eq!(split_point((1 << 63) + 1), 1 << 63);
        assert_eq!(split_point(1 << 63), 1 << 62);
    }

    #[test]
    fn inclusion_proofs_for_fixture_sizes() {
        let leaves = fixture_leaves();
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let root = mth(tree);
            for i in 0..n {
                let proof = inclusion_proof(tree, i as u64).unwrap();
                assert_eq!(proof, path_ref(i, tree), "n={n} i={i}");
                verify_inclusion(&tree[i], i as u64, n as u64, &proof, &root)
                    .unwrap_or_else(|e| panic!("n={n} i={i}: {e}"));
            }
        }
    }

    #[test]
    fn consistency_proofs_for_fixture_sizes() {
        let leaves = fixture_leaves();
        for n in 1..=leaves.len() {
            for m in 1..=n {
                let proof = consistency_proof(&leaves, m as u64, n as u64).unwrap();
                if m < n {
                    assert_eq!(proof, subproof_ref(m, &leaves[..n], true), "m={m} n={n}");
                } else {
                    assert!(proof.is_empty());
                }
                verify_consistency(
                    m as u64,
                    n as u64,
                    &mth(&leaves[..m]),
                    &mth(&leaves[..n]),
                    &proof,
                )
                .unwrap_or_else(|e| panic!("m={m} n={n}: {e}"));
            }
        }
    }

    #[test]
    fn rfc6962_example_ranges() {
        // RFC 6962 section 2.1.3, tree of 7 leaves d0..d6.
        assert_eq!(
            inclusion_proof_ranges(0, 7).unwrap(),
            vec![1..2, 2..4, 4..7]
        );
        assert_eq!(
            inclusion_proof_ranges(3, 7).unwrap(),
            vec![2..3, 0..2, 4..7]
        );
        assert_eq!(
            inclusion_proof_ranges(4, 7).unwrap(),
            vec![5..6, 6..7, 0..4]
        );
        assert_eq!(inclusion_proof_ranges(6, 7).unwrap(), vec![4..6, 0..4]);
        assert_eq!(
            consistency_proof_ranges(3, 7).unwrap(),
            vec![2..3, 3..4, 0..2, 4..7]
        );
        assert_eq!(consistency_proof_ranges(4, 7).unwrap(), vec![4..7]);
        assert_eq!(
            consistency_proof_ranges(6, 7).unwrap(),
            vec![4..6, 6..7, 0..4]
        );
        assert_eq!(inclusion_proof_ranges(0, 1).unwrap(), vec![]);
        assert_eq!(consistency_proof_ranges(0, 5).unwrap(), vec![]);
        assert_eq!(consistency_proof_ranges(5, 5).unwrap(), vec![]);
    }

    #[test]
    fn ranges_reject_bad_arguments() {
        assert_eq!(
            inclusion_proof_ranges(0, 0),
            Err(ProofError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert_eq!(
            inclusion_proof_ranges(5, 5),
            Err(ProofError::IndexOutOfRange { index: 5, size: 5 })
        );
        assert_eq!(
            consistency_proof_ranges(6, 5),
            Err(ProofError::SizeDecreased {
                old_size: 6,
                new_size: 5
            })
        );
        let leaves = synthetic_leaves(4);
        assert_eq!(
            consistency_proof(&leaves, 2, 5),
            Err(ProofError::NotEnoughLeaves {
                size: 5,
                available: 4
            })
        );
    }

    #[test]
    fn ranges_for_huge_trees() {
        let p = inclusion_proof_ranges(u64::MAX - 1, u64::MAX).unwrap();
        assert_eq!(p.len(), 63);
        // The siblings tile every leaf except the proven one.
        assert!(p
            .iter()
            .all(|r| r.start < r.end && !r.contains(&(u64::MAX - 1))));
        let covered: u128 = p.iter().map(|r| u128::from(r.end - r.start)).sum();
        assert_eq!(covered, u128::from(u64::MAX - 1));
        let c = consistency_proof_ranges(u64::MAX - 1, u64::MAX).unwrap();
        assert!(!c.is_empty() && c.len() <= 128);
        let c = consistency_proof_ranges(1, u64::MAX).unwrap();
        assert_eq!(c.len(), 64);
    }

    #[test]
    fn verifiers_reject_degenerate_inputs_without_panicking() {
        let h = [7u8; 32];
        let proof64 = vec![h; 64];
        let proof200 = vec![h; 200];
        for &(i, n) in &[
            (0, 0),
            (1, 0),
            (u64::MAX, u64::MAX),
            (u64::MAX - 1, u64::MAX),
            (0, u64::MAX),
            (0, 1),
            (1 << 63, u64::MAX),
        ] {
            for p in [&[][..], &proof64[..1], &proof64[..], &proof200[..]] {
                assert!(verify_inclusion(&h, i, n, p, &h).is_err() || (n == 1 && p.is_empty()));
            }
        }
        for &(m, n) in &[
            (0, 0),
            (1, 0),
            (u64::MAX, u64::MAX),
            (u64::MAX - 1, u64::MAX),
            (1, u64::MAX),
            (1 << 63, u64::MAX),
            ((1 << 63) - 1, 1 << 63),
            (3, 2),
        ] {
            for p in [&[][..], &proof64[..1], &proof64[..], &proof200[..]] {
                let _ = verify_consistency(m, n, &h, &[8; 32], p);
            }
        }
        // Equal sizes: empty proof and equal roots only.
        assert!(verify_consistency(5, 5, &h, &h, &[]).is_ok());
        assert!(verify_consistency(5, 5, &h, &[8; 32], &[]).is_err());
        assert!(verify_consistency(5, 5, &h, &h, &[h]).is_err());
        // Old size 0: only the true empty root, with an empty proof.
        assert!(verify_consistency(0, 5, &empty_root(), &h, &[]).is_ok());
        assert!(verify_consistency(0, 5, &h, &h, &[]).is_err());
        assert!(verify_consistency(0, 5, &empty_root(), &h, &[h]).is_err());
        assert!(verify_consistency(0, 0, &empty_root(), &empty_root(), &[]).is_ok());
    }

    #[test]
    fn builder_from_frontier_validates_length() {
        assert!(TreeBuilder::from_frontier(0, vec![]).is_ok());
        assert!(TreeBuilder::from_frontier(5, vec![[0; 32]; 2]).is_ok());
        assert_eq!(
            TreeBuilder::from_frontier(5, vec![[0; 32]; 3]),
            Err(FrontierError {
                size: 5,
                expected: 2,
                got: 3
            })
        );
        assert!(TreeBuilder::from_frontier(u64::MAX, vec![[0; 32]; 63]).is_err());
    }

    #[test]
    fn builder_frontier_is_perfect_subtree_roots() {
        let leaves = synthetic_leaves(13); // 13 = 8 + 4 + 1
        let mut b = TreeBuilder::new();
        b.extend(leaves.iter().copied());
        assert_eq!(
            b.frontier(),
            &[mth(&leaves[..8]), mth(&leaves[8..12]), mth(&leaves[12..])]
        );
    }

    #[test]
    fn builder_handles_many_leaves() {
        // Enough to exercise deep frontiers quickly in a debug build.
        let n = 100_000u64;
        let mut b = TreeBuilder::new();
        for i in 0..n {
            b.push(leaf_hash(&i.to_be_bytes()));
            assert_eq!(b.frontier().len() as u32, b.size().count_ones());
        }
        let leaves = synthetic_leaves(n as usize);
        assert_eq!(b.root(), mth(&leaves));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn builder_matches_recursive_definition(n in 0usize..300) {
            let leaves = synthetic_leaves(n);
            let mut b = TreeBuilder::new();
            for (i, l) in leaves.iter().enumerate() {
                prop_assert_eq!(b.root(), mth(&leaves[..i]));
                b.push(*l);
            }
            prop_assert_eq!(b.root(), mth(&leaves));
            prop_assert_eq!(b.size(), n as u64);
        }

        #[test]
        fn frontier_continuation_matches_full_rebuild(
            n in 0usize..300,
            cuts in proptest::collection::vec(0usize..300, 0..4),
        ) {
            let leaves = synthetic_leaves(n);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(n)).collect();
            cuts.sort_unstable();
            cuts.push(n);
            // Append snapshot by snapshot, resuming each time from the stored frontier.
            let mut stored = (0u64, Vec::new());
            let mut start = 0;
            for cut in cuts {
                let mut b = TreeBuilder::from_frontier(stored.0, stored.1.clone()).unwrap();
                b.extend(leaves[start..cut].iter().copied());
                prop_assert_eq!(b.root(), mth(&leaves[..cut]));
                stored = (b.size(), b.frontier().to_vec());
                start = cut;
            }
            prop_assert_eq!(stored.0, n as u64);
        }

        #[test]
        fn inclusion_proofs_verify_and_detect_tampering(
            n in 1usize..300,
            index_seed in any::<usize>(),
            flip in any::<(usize, u8)>(),
        ) {
            let leaves = synthetic_leaves(n);
            let index = index_seed % n;
            let root = mth(&leaves);
            let proof = inclusion_proof(&leaves, index as u64).unwrap();
            prop_assert_eq!(&proof, &path_ref(index, &leaves));
            let (i, n64, leaf) = (index as u64, n as u64, leaves[index]);
            prop_assert!(verify_inclusion(&leaf, i, n64, &proof, &root).is_ok());

            let bit = 1u8 << (flip.1 % 8);
            let byte = flip.0 % 32;
            // Any flipped byte in the proof, the root or the leaf.
            for k in 0..proof.len() {
                let mut bad = proof.clone();
                bad[k][byte] ^= bit;
                prop_assert!(verify_inclusion(&leaf, i, n64, &bad, &root).is_err());
            }
            let mut bad_root = root;
            bad_root[byte] ^= bit;
            prop_assert!(verify_inclusion(&leaf, i, n64, &proof, &bad_root).is_err());
            let mut bad_leaf = leaf;
            bad_leaf[byte] ^= bit;
            prop_assert!(verify_inclusion(&bad_leaf, i, n64, &proof, &root).is_err());
            // Any other index or size.
            for other in 0..n64 + 2 {
                if other != i {
                    prop_assert!(verify_inclusion(&leaf, other, n64, &proof, &root).is_err());
                }
            }
            // A different size verifies exactly when its audit path has the same
            // shape: the proof does not bind the size (the checkpoint does).
            for other in 0..n64 + 40 {
                if other != n64 {
                    let ok = verify_inclusion(&leaf, i, other, &proof, &root).is_ok();
                    let same = inclusion_shape(i, other) == inclusion_shape(i, n64);
                    prop_assert_eq!(ok, same, "size {} instead of {}", other, n64);
                }
            }
            // Truncated or extended proofs.
            if !proof.is_empty() {
                prop_assert!(verify_inclusion(&leaf, i, n64, &proof[1..], &root).is_err());
                prop_assert!(
                    verify_inclusion(&leaf, i, n64, &proof[..proof.len() - 1], &root).is_err()
                );
            }
            let mut longer = proof.clone();
            longer.push(root);
            prop_assert!(verify_inclusion(&leaf, i, n64, &longer, &root).is_err());
        }

        #[test]
        fn consistency_proofs_verify_and_detect_tampering(
            a in 1usize..300,
            b in 1usize..300,
            flip in any::<(usize, u8)>(),
        ) {
            let (m, n) = (a.min(b), a.max(b));
            let leaves = synthetic_leaves(n);
            let (old_root, new_root) = (mth(&leaves[..m]), mth(&leaves));
            let proof = consistency_proof(&leaves, m as u64, n as u64).unwrap();
            if m < n {
                prop_assert_eq!(&proof, &subproof_ref(m, &leaves, true));
            }
            let (m64, n64) = (m as u64, n as u64);
            prop_assert!(verify_consistency(m64, n64, &old_root, &new_root, &proof).is_ok());

            let bit = 1u8 << (flip.1 % 8);
            let byte = flip.0 % 32;
            for k in 0..proof.len() {
                let mut bad = proof.clone();
                bad[k][byte] ^= bit;
                prop_assert!(verify_consistency(m64, n64, &old_root, &new_root, &bad).is_err());
            }
            let mut bad_old = old_root;
            bad_old[byte] ^= bit;
            prop_assert!(verify_consistency(m64, n64, &bad_old, &new_root, &proof).is_err());
            let mut bad_new = new_root;
            bad_new[byte] ^= bit;
            prop_assert!(verify_consistency(m64, n64, &old_root, &bad_new, &proof).is_err());
            // Other sizes verify exactly when the proof has the same shape for
            // them: sizes are bound by signed checkpoints, not by the proof.
            let shape = consistency_shape(m64, n64);
            for other in 0..n64 + 40 {
                if other != m64 {
                    let ok = verify_consistency(other, n64, &old_root, &new_root, &proof).is_ok();
                    let same = shape.is_some() && consistency_shape(other, n64) == shape;
                    prop_assert_eq!(ok, same, "old size {} instead of {}", other, m64);
                }
                if other != n64 {
                    let ok = verify_consistency(m64, other, &old_root, &new_root, &proof).is_ok();
                    let same = shape.is_some() && consistency_shape(m64, other) == shape;
                    prop_assert_eq!(ok, same, "new size {} instead of {}", other, n64);
                }
            }
            if !proof.is_empty() {
                prop_assert!(
                    verify_consistency(m64, n64, &old_root, &new_root, &proof[1..]).is_err()
                );
            }
            let mut longer = proof.clone();
            longer.push(new_root);
            prop_assert!(verify_consistency(m64, n64, &old_root, &new_root, &longer).is_err());
        }

        #[test]
        fn verifiers_never_panic(
            index in any::<u64>(),
            size in any::<u64>(),
            old in any::<u64>(),
            proof in proptest::collection::vec(any::<[u8; 32]>(), 0..80),
            root in any::<[u8; 32]>(),
        ) {
            let _ = verify_inclusion(&root, index, size, &proof, &root);
            let _ = verify_inclusion(&root, index % size.max(1), size, &proof, &root);
            let _ = verify_consistency(old, size, &root, &root, &proof);
            let _ = verify_consistency(old.min(size), size, &root, &root, &proof);
            let _ = inclusion_proof_ranges(index % size.max(1), size);
            let _ = consistency_proof_ranges(old.min(size), size);
        }
    }
}
