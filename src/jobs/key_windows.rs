//! Reading many rows by key as one range scan plus a few lookups.
//!
//! `verify` needs, for every ledger entry of a chunk, the row it names and
//! that row's salts. Joined in SQL, that is two index descents per entry
//! (about eight buffer hits), the largest part of the database's work for
//! a full check. The entries of a chunk name rows that are nearly
//! contiguous in both keys: sealing appends rows in `(event_time, id)`
//! order, and ids come from a sequence in arrival order. So a chunk's rows
//! are read as one range of the primary key, and only the entries outside
//! that range (late events, stragglers) one by one. This module is the pure
//! part: choosing the ranges. Both are bounded so that a chunk never reads
//! more than a small multiple of its own size, however its keys are spread.

/// An inclusive range of ids, and the ids outside it, to read one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdWindow {
    /// `None` when there are no ids at all.
    pub range: Option<(i64, i64)>,
    pub outside: Vec<i64>,
}

/// The range of ids holding the most of `ids` while spanning fewer than
/// `2 * ids.len()` ids (so reading all of it reads at most twice as many
/// rows as are wanted, ids being unique), and the ids outside it.
///
/// `ids` is sorted in place. Two pointers over the sorted ids: O(n log n).
pub fn id_window(ids: &mut [i64]) -> IdWindow {
    ids.sort_unstable();
    if ids.is_empty() {
        return IdWindow {
            range: None,
            outside: Vec::new(),
        };
    }
    let span = 2 * ids.len() as i128;
    let (mut best, mut lo) = ((0, 0), 0);
    for hi in 0..ids.len() {
        while i128::from(ids[hi]) - i128::from(ids[lo]) >= span {
            lo += 1;
        }
        if hi - lo > best.1 - best.0 {
            best = (lo, hi);
        }
    }
    let outside = ids[..best.0]
        .iter()
        .chain(&ids[best.1 + 1..])
        .copied()
        .collect();
    IdWindow {
        range: Some((ids[best.0], ids[best.1])),
        outside,
    }
}

/// The most rows a range read of `wanted` keys may return before the rest
/// is looked up one by one: twice the keys, and some room for a chunk of
/// a few keys among rows that are not wanted (unsealed rows, say).
pub fn range_read_limit(wanted: usize) -> i64 {
    2 * wanted as i64 + 64
}

/// Positions of rows by key, for lookups in mostly increasing key order
/// (a chunk's entries follow the order its rows were read in): the next
/// key is tried first, then a binary search. Cheaper than hashing each key
/// for the rows of a chunk, which are read sorted.
pub struct KeyIndex<K> {
    keys: Vec<(K, usize)>,
    next: usize,
}

impl<K: Ord> KeyIndex<K> {
    /// Indexes `keys` by position (sorted here unless they already are).
    pub fn new(keys: impl IntoIterator<Item = K>) -> Self {
        let mut keys: Vec<(K, usize)> = keys.into_iter().zip(0..).collect();
        if !keys.is_sorted_by(|a, b| a.0 <= b.0) {
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        Self { keys, next: 0 }
    }

    /// The position of a row with key `k`, if any.
    pub fn find(&mut self, k: &K) -> Option<usize> {
        let at = match self.keys.get(self.next) {
            Some((next, _)) if next == k => self.next,
            _ => self.keys.partition_point(|(key, _)| key < k),
        };
        match self.keys.get(at) {
            Some((key, i)) if key == k => {
                self.next = at + 1;
                Some(*i)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_index_finds_keys_in_any_order_and_only_those_present() {
        let mut ix = KeyIndex::new([30, 10, 20, 50]);
        assert_eq!(ix.find(&10), Some(1));
        assert_eq!(ix.find(&20), Some(2));
        assert_eq!(ix.find(&30), Some(0));
        assert_eq!(ix.find(&10), Some(1));
        assert_eq!(ix.find(&40), None);
        assert_eq!(ix.find(&50), Some(3));
        assert_eq!(ix.find(&60), None);
        assert_eq!(KeyIndex::<i64>::new([]).find(&1), None);
    }

    #[test]
    fn contiguous_ids_are_one_range_with_nothing_outside() {
        let mut ids: Vec<i64> = (100..110).rev().collect();
        assert_eq!(
            id_window(&mut ids),
            IdWindow {
                range: Some((100, 109)),
                outside: vec![]
            }
        );
    }

    #[test]
    fn far_stragglers_on_either_side_are_read_one_by_one() {
        let mut ids: Vec<i64> = (1000..1010).collect();
        ids.extend([3, 999_999]);
        let w = id_window(&mut ids);
        assert_eq!(w.range, Some((1000, 1009)));
        assert_eq!(w.outside, vec![3, 999_999]);
    }

    #[test]
    fn gaps_within_twice_the_count_stay_in_the_range() {
        // 5 ids spread over 9 ids: the range reads 9 rows for 5 wanted.
        let mut ids = vec![10, 12, 14, 16, 18];
        assert_eq!(id_window(&mut ids).range, Some((10, 18)));
        // Spread over more than twice their count: not one range.
        let mut ids = vec![10, 20, 30];
        let w = id_window(&mut ids);
        assert_eq!(w.range.map(|(lo, hi)| hi - lo), Some(0));
        assert_eq!(w.outside.len(), 2);
    }

    #[test]
    fn the_range_never_spans_twice_the_count_whatever_the_ids() {
        let mut seed = 7u64;
        for n in 1..200usize {
            let mut ids: Vec<i64> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 40) as i64 % (4 * n as i64 + 1)
                })
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let count = ids.len();
            let w = id_window(&mut ids);
            let (lo, hi) = w.range.unwrap();
            assert!(hi - lo < 2 * count as i64, "n={n}");
            let inside = ids.iter().filter(|&&i| i >= lo && i <= hi).count();
            assert_eq!(inside + w.outside.len(), count);
            assert!(w.outside.iter().all(|&i| i < lo || i > hi));
        }
    }

    #[test]
    fn extreme_ids_do_not_overflow() {
        let mut ids = vec![i64::MIN, i64::MAX, 0];
        let w = id_window(&mut ids);
        assert_eq!(w.outside.len(), 2);
    }

    #[test]
    fn no_ids_no_range() {
        assert_eq!(id_window(&mut []).range, None);
    }
}
