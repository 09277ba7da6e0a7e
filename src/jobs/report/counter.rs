//! Bounded counting for report breakdowns (by principal, resource, action).
//!
//! A report streams over any number of rows, and the number of distinct
//! principals or resources is unbounded too, so a plain map could grow
//! without limit. [`TopCounter`] is the space-saving algorithm (Metwally et
//! al.): at most `capacity` keys are tracked; a new key beyond that takes
//! the place of the smallest one and inherits its count as possible
//! overcount. While no key was ever evicted every count is exact; after
//! that every key whose true count exceeds `total / capacity` is still
//! tracked, and each count is at most `overcount` too high.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

/// Counts keys in bounded memory (see the module docs).
#[derive(Debug, Clone)]
pub struct TopCounter {
    capacity: usize,
    counts: HashMap<String, (u64, u64)>,
    /// (count, key), to find the smallest entry in O(log n).
    order: BTreeSet<(u64, String)>,
    total: u64,
    evictions: u64,
}

/// One entry of a breakdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counted {
    pub key: String,
    pub count: u64,
    /// How much `count` may exceed the true count (0: exact).
    pub overcount: u64,
}

/// A breakdown as reported: the largest entries and whether it is exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Breakdown {
    pub entries: Vec<Counted>,
    /// Everything counted, including keys not listed.
    pub total: u64,
    /// True when every count is exact (no key was ever evicted).
    pub exact: bool,
    /// Distinct keys seen, when exact (unknown otherwise).
    pub distinct: Option<u64>,
}

impl TopCounter {
    /// A counter tracking at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            counts: HashMap::new(),
            order: BTreeSet::new(),
            total: 0,
            evictions: 0,
        }
    }

    /// Counts one occurrence of `key`.
    pub fn add(&mut self, key: &str) {
        self.total += 1;
        if let Some((count, _)) = self.counts.get_mut(key) {
            self.order.remove(&(*count, key.to_owned()));
            *count += 1;
            self.order.insert((*count, key.to_owned()));
            return;
        }
        let (count, overcount) = if self.counts.len() < self.capacity {
            (1, 0)
        } else {
            // Replace the smallest entry; the newcomer may have occurred up
            // to that many times before (uncounted).
            let Some((min, victim)) = self.order.pop_first() else {
                return;
            };
            self.counts.remove(&victim);
            self.evictions += 1;
            (min + 1, min)
        };
        self.counts.insert(key.to_owned(), (count, overcount));
        self.order.insert((count, key.to_owned()));
    }

    /// Everything counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The `n` largest entries, largest first (ties by key, ascending).
    pub fn top(&self, n: usize) -> Breakdown {
        let mut entries: Vec<Counted> = self
            .counts
            .iter()
            .map(|(k, &(count, overcount))| Counted {
                key: k.clone(),
                count,
                overcount,
            })
            .collect();
        entries.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        entries.truncate(n);
        let exact = self.evictions == 0;
        Breakdown {
            entries,
            total: self.total,
            exact,
            distinct: exact.then_some(self.counts.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_capacity_counts_are_exact_and_sorted() {
        let mut c = TopCounter::new(10);
        for k in ["b", "a", "b", "c", "b", "a"] {
            c.add(k);
        }
        let t = c.top(2);
        assert!(t.exact);
        assert_eq!(t.total, 6);
        assert_eq!(t.distinct, Some(3));
        assert_eq!(
            t.entries,
            vec![
                Counted {
                    key: "b".into(),
                    count: 3,
                    overcount: 0
                },
                Counted {
                    key: "a".into(),
                    count: 2,
                    overcount: 0
                }
            ]
        );
    }

    #[test]
    fn beyond_capacity_memory_stays_bounded_and_heavy_hitters_survive() {
        let mut c = TopCounter::new(5);
        for i in 0..10_000 {
            c.add(&format!("rare-{i}"));
            if i % 3 == 0 {
                c.add("heavy");
            }
        }
        assert!(c.counts.len() <= 5 && c.order.len() <= 5);
        let t = c.top(1);
        assert!(!t.exact);
        assert_eq!(t.distinct, None);
        assert_eq!(t.entries[0].key, "heavy");
        // True count 3334: the estimate is at least that, and at most
        // overcount above it.
        let e = &t.entries[0];
        assert!(e.count >= 3334 && e.count - e.overcount <= 3334, "{e:?}");
        assert_eq!(t.total, 13_334);
    }
}
