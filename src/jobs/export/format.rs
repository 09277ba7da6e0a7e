//! Turning rows into file bytes: the fixed column set, the text formats
//! (csv, ndjson, json, ocsf), the compressors, and [`PartEncoder`], which
//! also covers parquet.
//!
//! Output must be a pure function of the rows and their position: a resumed
//! export re-creates parts byte for byte. Hence no timestamps in gzip
//! headers, single-threaded zstd, and JSON separators decided by the row's
//! global index rather than by what was written before.

use std::io::Write;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use flate2::write::GzEncoder;
use flate2::GzBuilder;

use super::ocsf::Mapping;
use super::parquet::{ParquetSchema, PartWriter};
use super::request::{Compression, Format};

/// The exported columns, in order. The README documents them; changing
/// them changes every export's bytes, so add at the end only.
pub const COLUMNS: [&str; 30] = [
    "id",
    "event_time",
    "timestamp",
    "event_id",
    "action",
    "status",
    "principal_id",
    "organization_id",
    "target_resource_type",
    "target_resource_id",
    "outcome_description",
    "data_classification",
    "correlation_id",
    "event_version",
    "retention_policy",
    "session_context",
    "details",
    "hash",
    "hash_algorithm",
    "signature",
    "signature_algorithm",
    "signature_key_id",
    "ingested_at",
    // What an auditor needs to recompute the record digest (leaf v2) and
    // place it in the log: the remaining stored columns, the event's salts,
    // and its ledger entry (null while unsealed).
    "idempotency_key",
    "hash_provided",
    "source",
    "salts",
    "leaf_index",
    "leaf_version",
    // After a GDPR erasure: the commitments kept for the erased paths,
    // which stand for their values in the record digest (null otherwise).
    "erased_commitments",
];

/// The SELECT list producing [`COLUMNS`] in order (JSON columns as text,
/// which PostgreSQL renders deterministically for jsonb).
///
/// Each subquery is one index probe per row, which costs PostgreSQL more
/// than reading the row itself, so there are as few as the columns allow:
/// the ledger entry's leaf index and version come as one `"<index>
/// <version>"` text ([`ExportRow::from_pg`] splits it), and the erasure
/// probe runs only when the statement's snapshot holds any erasure (an
/// uncorrelated `EXISTS`, evaluated once per statement, so a page read
/// while an erasure commits is consistent either way).
pub const SELECT_LIST: &str = "id, event_time, timestamp_raw, event_id, action, status, \
    principal_id, organization_id, target_resource_type, target_resource_id, \
    outcome_description, data_classification, correlation_id, event_version, \
    retention_policy, session_context::text, details::text, hash, hash_algorithm, \
    signature, signature_algorithm, signature_key_id, ingested_at, \
    idempotency_key, to_jsonb(hash_provided)::text, source, \
    (SELECT s.salts::text FROM audit_salts s WHERE s.audit_id = audit_log.id), \
    (SELECT l.leaf_index || ' ' || l.leaf_version FROM seal_ledger l \
      WHERE l.event_time = audit_log.event_time AND l.row_id = audit_log.id), \
    CASE WHEN (SELECT EXISTS (SELECT 1 FROM audit_erasures)) THEN \
      (SELECT e.commitments::text FROM audit_erasures e WHERE e.audit_id = audit_log.id) END";

/// One exported value.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    Int(i64),
    Time(DateTime<Utc>),
    Text(Option<&'a str>),
    /// JSON text (jsonb rendered by PostgreSQL), or none.
    Json(Option<&'a str>),
}

/// One audit_log row, borrowed from the database row, in [`COLUMNS`] order.
pub struct ExportRow<'a> {
    pub cells: [Cell<'a>; 30],
}

impl<'a> ExportRow<'a> {
    /// Reads a row selected with [`SELECT_LIST`].
    pub fn from_pg(row: &'a tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        let t = |i: usize| -> Result<Cell<'a>, tokio_postgres::Error> {
            Ok(Cell::Text(row.try_get::<_, Option<&str>>(i)?))
        };
        let j = |i: usize| -> Result<Cell<'a>, tokio_postgres::Error> {
            Ok(Cell::Json(row.try_get::<_, Option<&str>>(i)?))
        };
        let (leaf_index, leaf_version) = ledger_cells(row.try_get(27)?);
        Ok(Self {
            cells: [
                Cell::Int(row.try_get(0)?),
                Cell::Time(row.try_get(1)?),
                t(2)?,
                t(3)?,
                t(4)?,
                t(5)?,
                t(6)?,
                t(7)?,
                t(8)?,
                t(9)?,
                t(10)?,
                t(11)?,
                t(12)?,
                t(13)?,
                t(14)?,
                j(15)?,
                j(16)?,
                t(17)?,
                t(18)?,
                t(19)?,
                t(20)?,
                t(21)?,
                Cell::Time(row.try_get(22)?),
                t(23)?,
                j(24)?,
                t(25)?,
                j(26)?,
                leaf_index,
                leaf_version,
                j(28)?,
            ],
        })
    }
}

/// Splits the ledger column of [`SELECT_LIST`] (`"<index> <version>"`, or
/// none while the row is unsealed) into the leaf index and leaf version,
/// both integers as JSON text.
fn ledger_cells(ledger: Option<&str>) -> (Cell<'_>, Cell<'_>) {
    match ledger.and_then(|l| l.split_once(' ')) {
        Some((index, version)) => (Cell::Json(Some(index)), Cell::Json(Some(version))),
        None => (Cell::Json(None), Cell::Json(None)),
    }
}

fn time_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Spreadsheet formula injection guard for CSV: a cell starting with `=`,
/// `+`, `-`, `@`, tab or carriage return would be evaluated by Excel and
/// the like, so it gets a leading `'`. A cell that already starts with `'`
/// gets one too, which makes the rule reversible without ambiguity: to
/// recover the stored value, drop one leading `'` when present.
pub fn neutralise_formula(s: &str) -> std::borrow::Cow<'_, str> {
    match s.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r' | b'\'') => format!("'{s}").into(),
        _ => s.into(),
    }
}

/// The bytes written once before the first row.
pub fn header(format: Format) -> Vec<u8> {
    match format {
        Format::Csv => {
            let mut w = csv_writer(Vec::new());
            let _ = w.write_record(COLUMNS);
            w.into_inner().unwrap_or_default()
        }
        Format::Json => b"[\n".to_vec(),
        // Parquet parts are whole files; the artifact is composed apart.
        Format::Ndjson | Format::Ocsf | Format::Parquet | Format::ParquetOcsf => Vec::new(),
    }
}

/// The bytes written once after the last row.
pub fn trailer(format: Format) -> &'static [u8] {
    match format {
        Format::Json => b"\n]\n",
        _ => b"",
    }
}

fn csv_writer<W: Write>(w: W) -> csv::Writer<W> {
    // RFC 4180: CRLF line ends, fields quoted when they contain a comma,
    // quote or line break, quotes doubled.
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .quote_style(csv::QuoteStyle::Necessary)
        .from_writer(w)
}

/// Appends `rows` (whose first has global index `first_index`) to `out`,
/// for the csv, ndjson and json formats (ocsf and parquet need the OCSF
/// mapping or a Parquet writer: see [`PartEncoder`]).
pub fn write_rows(
    format: Format,
    rows: &[ExportRow<'_>],
    first_index: u64,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    match format {
        Format::Csv => {
            let mut w = csv_writer(&mut *out);
            let mut scratch = String::new();
            for row in rows {
                for cell in &row.cells {
                    let text: std::borrow::Cow<'_, str> = match cell {
                        Cell::Int(i) => {
                            scratch.clear();
                            use std::fmt::Write as _;
                            let _ = write!(scratch, "{i}");
                            scratch.as_str().into()
                        }
                        Cell::Time(t) => time_text(t).into(),
                        Cell::Text(v) | Cell::Json(v) => neutralise_formula(v.unwrap_or("")),
                    };
                    w.write_field(text.as_bytes())?;
                }
                w.write_record(None::<&[u8]>)?;
            }
            w.flush()?;
        }
        Format::Ndjson | Format::Json => {
            for (i, row) in rows.iter().enumerate() {
                if format == Format::Json && first_index + i as u64 > 0 {
                    out.extend_from_slice(b",\n");
                }
                write_json_object(row, out)?;
                if format == Format::Ndjson {
                    out.push(b'\n');
                }
            }
        }
        Format::Ocsf | Format::Parquet | Format::ParquetOcsf => {
            return Err(std::io::Error::other(format!(
                "format {} is not written by format::write_rows",
                format.as_str()
            )))
        }
    }
    Ok(())
}

/// Turns the rows of one part into the part's bytes, for any format: the
/// text formats as one compressed member (through an [`Encoder`]), parquet
/// as one complete Parquet file.
pub enum PartEncoder {
    Text {
        format: Format,
        mapping: Arc<Mapping>,
        encoder: Encoder,
    },
    Parquet(Box<PartWriter>),
}

impl PartEncoder {
    /// Starts a part.
    pub fn new(
        format: Format,
        compression: Compression,
        levels: Levels,
        mapping: Arc<Mapping>,
        parquet_row_group_rows: u64,
    ) -> std::io::Result<Self> {
        Ok(match format {
            Format::Parquet | Format::ParquetOcsf => {
                let schema = if format == Format::Parquet {
                    ParquetSchema::Columns
                } else {
                    ParquetSchema::Ocsf
                };
                Self::Parquet(Box::new(PartWriter::new(
                    schema,
                    mapping,
                    parquet_row_group_rows,
                )?))
            }
            _ => Self::Text {
                format,
                mapping,
                encoder: Encoder::new(compression, levels)?,
            },
        })
    }

    /// Adds rows (the first has global index `first_index`).
    pub fn write_rows(&mut self, rows: &[ExportRow<'_>], first_index: u64) -> std::io::Result<()> {
        match self {
            Self::Text {
                format,
                mapping,
                encoder,
            } => {
                let mut raw = Vec::with_capacity(rows.len() * 512);
                if *format == Format::Ocsf {
                    super::ocsf::write_rows(mapping, rows, &mut raw)?;
                } else {
                    write_rows(*format, rows, first_index, &mut raw)?;
                }
                encoder.write_all(&raw)
            }
            Self::Parquet(w) => w.write_rows(rows),
        }
    }

    /// Takes the bytes produced so far (to upload them).
    pub fn take_output(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Text { encoder, .. } => Ok(encoder.take_output()),
            Self::Parquet(w) => w.take_output(),
        }
    }

    /// Ends the part and returns its remaining bytes.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Text { encoder, .. } => encoder.finish(),
            Self::Parquet(w) => w.finish(),
        }
    }
}

fn write_json_object(row: &ExportRow<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
    out.push(b'{');
    for (i, (name, cell)) in COLUMNS.iter().zip(row.cells.iter()).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        match cell {
            Cell::Int(v) => write!(out, "{v}")?,
            Cell::Time(t) => serde_json::to_writer(&mut *out, &time_text(t))?,
            Cell::Text(Some(s)) => serde_json::to_writer(&mut *out, s)?,
            // jsonb text output is valid JSON: embed it as a nested value.
            Cell::Json(Some(s)) => out.extend_from_slice(s.as_bytes()),
            Cell::Text(None) | Cell::Json(None) => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
    Ok(())
}

/// Compresses one part into one independent member (gzip member, zstd
/// frame, or plain bytes); concatenated members form a valid file.
pub enum Encoder {
    /// Boxed: zlib-rs's state makes the encoder a few hundred bytes.
    Gzip(Box<GzEncoder<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Plain(Vec<u8>),
}

/// Compression levels from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Levels {
    pub gzip: u32,
    pub zstd: i32,
}

impl Encoder {
    /// Starts a member.
    pub fn new(compression: Compression, levels: Levels) -> std::io::Result<Self> {
        Ok(match compression {
            // mtime 0 and no file name: the header is the same every time.
            Compression::Gzip => Self::Gzip(Box::new(
                GzBuilder::new()
                    .mtime(0)
                    .write(Vec::new(), flate2::Compression::new(levels.gzip)),
            )),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), levels.zstd)?;
                e.include_checksum(true)?;
                Self::Zstd(e)
            }
            Compression::None => Self::Plain(Vec::new()),
        })
    }

    /// Feeds uncompressed bytes.
    pub fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Gzip(e) => e.write_all(data),
            Self::Zstd(e) => e.write_all(data),
            Self::Plain(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// Takes the compressed bytes produced so far (to upload them).
    pub fn take_output(&mut self) -> Vec<u8> {
        match self {
            Self::Gzip(e) => std::mem::take(e.get_mut()),
            Self::Zstd(e) => std::mem::take(e.get_mut()),
            Self::Plain(v) => std::mem::take(v),
        }
    }

    /// Ends the member and returns its remaining bytes.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Gzip(e) => (*e).finish(),
            Self::Zstd(e) => e.finish(),
            Self::Plain(v) => Ok(v),
        }
    }
}

/// Compresses a small, complete piece (header or trailer) as one member;
/// empty input gives no bytes at all.
pub fn compress_whole(
    data: &[u8],
    compression: Compression,
    levels: Levels,
) -> std::io::Result<Vec<u8>> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut e = Encoder::new(compression, levels)?;
    e.write_all(data)?;
    let mut out = e.take_output();
    out.extend(e.finish()?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_ledger_column_splits_into_leaf_index_and_version_or_two_nulls() {
        let json = |c: Cell<'_>| match c {
            Cell::Json(j) => j.map(str::to_owned),
            _ => panic!("not a JSON cell"),
        };
        let (index, version) = ledger_cells(Some("1048575 2"));
        assert_eq!(json(index).as_deref(), Some("1048575"));
        assert_eq!(json(version).as_deref(), Some("2"));
        let (index, version) = ledger_cells(None);
        assert_eq!((json(index), json(version)), (None, None));
    }

    fn row<'a>(id: i64, text: &'a str, json: Option<&'a str>) -> ExportRow<'a> {
        let t = DateTime::from_timestamp(1_709_251_200, 123_456_000).unwrap();
        let mut cells = [Cell::Text(None); COLUMNS.len()];
        cells[0] = Cell::Int(id);
        cells[1] = Cell::Time(t);
        cells[2] = Cell::Text(Some("2024-03-01T00:00:00.123456Z"));
        cells[10] = Cell::Text(Some(text));
        cells[15] = Cell::Json(json);
        cells[22] = Cell::Time(t);
        ExportRow { cells }
    }

    #[test]
    fn csv_quotes_per_rfc4180_and_neutralises_formulas() {
        let rows = [
            row(1, "a,b \"q\"\nline2 Zoë 日本", Some(r#"{"k": "v"}"#)),
            row(2, "=SUM(A1)", None),
            row(3, "'quoted", None),
        ];
        let mut out = header(Format::Csv);
        write_rows(Format::Csv, &rows, 0, &mut out).unwrap();
        let mut r = csv::Reader::from_reader(&out[..]);
        assert_eq!(r.headers().unwrap().len(), COLUMNS.len());
        let recs: Vec<csv::StringRecord> = r.records().map(|r| r.unwrap()).collect();
        assert_eq!(&recs[0][10], "a,b \"q\"\nline2 Zoë 日本");
        assert_eq!(&recs[0][15], r#"{"k": "v"}"#);
        assert_eq!(&recs[1][10], "'=SUM(A1)");
        assert_eq!(&recs[2][10], "''quoted");
        assert_eq!(&recs[0][1], "2024-03-01T00:00:00.123456Z");
        assert!(out.windows(2).any(|w| w == b"\r\n"));
    }

    #[test]
    fn json_split_anywhere_gives_the_same_bytes() {
        let rows: Vec<ExportRow> = (0..5).map(|i| row(i, "x\u{1}\"", None)).collect();
        let mut whole = header(Format::Json);
        write_rows(Format::Json, &rows, 0, &mut whole).unwrap();
        whole.extend_from_slice(trailer(Format::Json));
        let mut split = header(Format::Json);
        write_rows(Format::Json, &rows[..2], 0, &mut split).unwrap();
        write_rows(Format::Json, &rows[2..], 2, &mut split).unwrap();
        split.extend_from_slice(trailer(Format::Json));
        assert_eq!(whole, split);
        let v: serde_json::Value = serde_json::from_slice(&whole).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 5);
        assert_eq!(v[4]["outcome_description"], "x\u{1}\"");
        assert!(v[4]["session_context"].is_null());
        let empty: serde_json::Value = serde_json::from_slice(
            &[header(Format::Json), trailer(Format::Json).to_vec()].concat(),
        )
        .unwrap();
        assert_eq!(empty, serde_json::json!([]));
    }

    #[test]
    fn concatenated_members_decompress_to_the_concatenated_input() {
        let levels = Levels { gzip: 6, zstd: 3 };
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let mut file = Vec::new();
            for piece in [&b"hello "[..], b"", b"world"] {
                file.extend(compress_whole(piece, c, levels).unwrap());
            }
            let again: Vec<u8> = [&b"hello "[..], b"world"]
                .iter()
                .flat_map(|p| compress_whole(p, c, levels).unwrap())
                .collect();
            assert_eq!(file, again, "{c:?} is deterministic");
            let mut plain = Vec::new();
            match c {
                Compression::Gzip => {
                    flate2::read::MultiGzDecoder::new(&file[..])
                        .read_to_end(&mut plain)
                        .unwrap();
                }
                Compression::Zstd => plain = zstd::decode_all(&file[..]).unwrap(),
                Compression::None => plain = file.clone(),
            }
            assert_eq!(plain, b"hello world");
        }
    }
}
