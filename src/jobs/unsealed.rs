//! Where unsealed rows (stored, but without a ledger entry) can be, as
//! reads: for sealing, which appends them, and for `verify`, which reports
//! those inside sealed ranges. Pure planning, no I/O.
//!
//! Two facts bound the search. The event-time ranges earlier snapshots
//! sealed ([`SealedRanges`]): a row inside one is late (or inserted). And
//! the mark each snapshot without a `from` leaves ([`ArrivalsMark`]): below
//! its end, only rows inserted by transactions from its xmin on can still
//! be unsealed. With a mark, finding late events reads what arrived since
//! the last seal (through the BRIN index `audit_log_arrival` on
//! `ingest_xid`), not the whole log.

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

/// An event-time range `[from, to)`; `from` None: from the beginning.
pub type TimeRange = (Option<DateTime<Utc>>, DateTime<Utc>);

/// The event-time ranges snapshots sealed, sorted and merged where they
/// overlap or touch.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedRanges(Vec<TimeRange>);

impl SealedRanges {
    /// Merges `ranges` (in any order).
    pub fn new(mut ranges: Vec<TimeRange>) -> Self {
        ranges.sort_by_key(|(f, _)| *f);
        let mut merged: Vec<TimeRange> = Vec::new();
        for (f, t) in ranges {
            match merged.last_mut() {
                Some((_, lt)) if f.is_none_or(|f| f <= *lt) => *lt = (*lt).max(t),
                _ => merged.push((f, t)),
            }
        }
        Self(merged)
    }

    /// Whether an event at `t` lies in a sealed range (arriving now, it is
    /// late).
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        // Few ranges after merging (one per gap between requested ranges).
        self.0
            .iter()
            .any(|(f, to)| f.is_none_or(|f| f <= t) && t < *to)
    }

    /// The merged ranges, earliest first.
    pub fn ranges(&self) -> &[TimeRange] {
        &self.0
    }
}

/// What a snapshot that sealed everything before its end vouches for:
/// every row with `event_time` before `before` inserted by a transaction
/// below `xmin` is sealed. `xmin` is the xmin of the seal's read snapshot:
/// every transaction below it had ended when the read began, so the read
/// saw all its rows. A transaction from `xmin` on may have committed after
/// (a writer still open during the read stays above the mark), so its
/// rows are read again by the next seal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrivalsMark {
    pub xmin: i64,
    pub before: DateTime<Utc>,
}

impl ArrivalsMark {
    /// The mark, if it can be trusted by a reader whose snapshot's xmin is
    /// `xmin`. Transaction ids only grow in one cluster, so a mark above
    /// it was recorded by another one (a log restored from a logical dump
    /// into a cluster whose ids are lower): rows stored now would all look
    /// older than the mark, so it is not used, and the read covers
    /// everything, as without a mark.
    pub fn usable(self, xmin: i64) -> Option<Self> {
        (self.xmin <= xmin).then_some(self)
    }
}

/// One read of unsealed rows: those with `event_time` in `[from, to)`,
/// and, when `arrived_from` is set, inserted by a transaction from that id
/// on (`ingest_xid`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnsealedRead {
    pub from: Option<DateTime<Utc>>,
    pub to: DateTime<Utc>,
    pub arrived_from: Option<i64>,
}

impl UnsealedRead {
    /// The read's condition on `audit_log a`, with `$1` `from`
    /// (timestamptz, may be NULL), `$2` `to` and, when `arrived_from` is
    /// set, `$3` it (bigint). The arrival test is written as the index's
    /// expression so that the planner can use the index.
    pub fn condition(&self) -> &'static str {
        match self.arrived_from {
            None => "($1::timestamptz IS NULL OR a.event_time >= $1) AND a.event_time < $2",
            Some(_) => {
                "($1::timestamptz IS NULL OR a.event_time >= $1) AND a.event_time < $2 \
                 AND (a.ingest_xid::text)::bigint >= $3"
            }
        }
    }

    /// The parameters of [`Self::condition`], in order.
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.from, &self.to];
        if let Some(xid) = &self.arrived_from {
            params.push(xid);
        }
        params
    }
}

/// The reads of a seal, in leaf order, and the end it vouches for (see
/// [`ArrivalsMark`]) when it seals everything before that end.
#[derive(Debug, PartialEq)]
pub struct SealReads {
    pub reads: Vec<UnsealedRead>,
    pub vouches_before: Option<DateTime<Utc>>,
}

/// Plans the reads of a seal of `[from, to)` given the latest mark. A seal
/// with a `from` reads its range and vouches for nothing (rows before its
/// start may be unsealed). One without reads everything before `to`: with
/// a mark, the rows before the mark's end that arrived from its xmin on,
/// then the range from the mark's end (each row of the first read lies
/// before each of the second, so the leaves stay in (event_time, id)
/// order); without one (the first such seal, or the first after an
/// upgrade) the whole range once.
pub fn seal_reads(
    from: Option<DateTime<Utc>>,
    to: DateTime<Utc>,
    mark: Option<ArrivalsMark>,
) -> SealReads {
    let reads = match (from, mark) {
        (None, Some(mark)) => split_at_mark(&[(None, to)], mark),
        _ => vec![UnsealedRead {
            from,
            to,
            arrived_from: None,
        }],
    };
    SealReads {
        reads,
        vouches_before: from.is_none().then_some(to),
    }
}

/// The reads that find unsealed rows inside `sealed`: every row there
/// (`mark` None, a full check), or, for a check of what was appended since
/// a snapshot, what a seal after that snapshot's mark would read (rows
/// before the mark's end that were stored before its read were sealed
/// then; a full check looks at them).
pub fn check_reads(sealed: &SealedRanges, mark: Option<ArrivalsMark>) -> Vec<UnsealedRead> {
    match mark {
        Some(mark) => split_at_mark(sealed.ranges(), mark),
        None => sealed
            .ranges()
            .iter()
            .map(|&(from, to)| UnsealedRead {
                from,
                to,
                arrived_from: None,
            })
            .collect(),
    }
}

/// `ranges` (sorted, disjoint) as reads: below the mark's end only the
/// rows that arrived from its xmin on, from its end on every row.
fn split_at_mark(ranges: &[TimeRange], mark: ArrivalsMark) -> Vec<UnsealedRead> {
    let mut reads = Vec::new();
    for &(from, to) in ranges {
        if from.is_none_or(|f| f < mark.before) {
            reads.push(UnsealedRead {
                from,
                to: to.min(mark.before),
                arrived_from: Some(mark.xmin),
            });
        }
        if to > mark.before {
            reads.push(UnsealedRead {
                from: Some(from.map_or(mark.before, |f| f.max(mark.before))),
                to,
                arrived_from: None,
            });
        }
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, 0, 0).unwrap()
    }

    fn read(from: Option<u32>, to: u32, arrived_from: Option<i64>) -> UnsealedRead {
        UnsealedRead {
            from: from.map(t),
            to: t(to),
            arrived_from,
        }
    }

    /// A mark at 10:00, xmin 900.
    fn mark() -> ArrivalsMark {
        ArrivalsMark {
            xmin: 900,
            before: t(10),
        }
    }

    #[test]
    fn sealed_ranges_merge_where_they_overlap_or_touch() {
        let r = SealedRanges::new(vec![
            (Some(t(5)), t(6)),
            (Some(t(1)), t(3)),
            (Some(t(3)), t(4)),
            (Some(t(2)), t(3)),
        ]);
        assert_eq!(r.ranges(), &[(Some(t(1)), t(4)), (Some(t(5)), t(6))]);
        assert!(r.contains(t(1)) && r.contains(t(3)) && r.contains(t(5)));
        assert!(!r.contains(t(4)) && !r.contains(t(6)) && !r.contains(t(0)));
        let open = SealedRanges::new(vec![(Some(t(5)), t(6)), (None, t(2))]);
        assert_eq!(open.ranges(), &[(None, t(2)), (Some(t(5)), t(6))]);
        assert!(open.contains(DateTime::<Utc>::MIN_UTC));
    }

    #[test]
    fn a_seal_without_from_reads_arrivals_since_the_mark_then_its_new_range() {
        assert_eq!(
            seal_reads(None, t(11), Some(mark())),
            SealReads {
                reads: vec![read(None, 10, Some(900)), read(Some(10), 11, None)],
                vouches_before: Some(t(11)),
            }
        );
        // An end at or before the mark's: the arrivals up to that end only.
        for to in [9, 10] {
            assert_eq!(
                seal_reads(None, t(to), Some(mark())),
                SealReads {
                    reads: vec![read(None, to, Some(900))],
                    vouches_before: Some(t(to)),
                }
            );
        }
        // No mark yet: the whole range once; it vouches for its end.
        assert_eq!(
            seal_reads(None, t(11), None),
            SealReads {
                reads: vec![read(None, 11, None)],
                vouches_before: Some(t(11)),
            }
        );
        // A requested range: just that range, vouching for nothing.
        assert_eq!(
            seal_reads(Some(t(3)), t(11), Some(mark())),
            SealReads {
                reads: vec![read(Some(3), 11, None)],
                vouches_before: None,
            }
        );
    }

    #[test]
    fn a_check_since_a_mark_reads_old_ranges_by_arrival_and_new_ones_whole() {
        let sealed = SealedRanges::new(vec![
            (None, t(4)),
            (Some(t(6)), t(12)),
            (Some(t(13)), t(14)),
        ]);
        assert_eq!(
            check_reads(&sealed, Some(mark())),
            vec![
                read(None, 4, Some(900)),
                read(Some(6), 10, Some(900)),
                read(Some(10), 12, None),
                read(Some(13), 14, None),
            ]
        );
        assert_eq!(
            check_reads(&sealed, None),
            vec![
                read(None, 4, None),
                read(Some(6), 12, None),
                read(Some(13), 14, None)
            ]
        );
    }

    #[test]
    fn a_mark_from_ids_above_the_readers_is_not_used() {
        assert_eq!(mark().usable(900), Some(mark()));
        assert_eq!(mark().usable(5_000), Some(mark()));
        assert_eq!(mark().usable(899), None);
    }

    #[test]
    fn the_condition_names_the_arrival_parameter_only_when_it_is_set() {
        assert!(!read(None, 4, None).condition().contains("$3"));
        assert!(read(None, 4, Some(1))
            .condition()
            .contains("(a.ingest_xid::text)::bigint >= $3"));
    }
}
