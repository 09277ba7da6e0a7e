//! The bounded read: XREADGROUP without BLOCK, in a Lua script that
//! dead-letters, acknowledges and deletes oversized entries inside Redis,
//! so they never reach the worker's memory (see `read_bounded.lua`).

use crate::source::RedisConn;
use redis::Value;

use super::reply::{bytes_of, entries_from, stream_id_less, StreamEntry};

/// The script. Hand-written because no crate does this; it touches only
/// our own stream and dead-letter stream, never BullMQ's keys.
pub const BOUNDED_READ_LUA: &str = include_str!("read_bounded.lua");

/// Bytes of oversized entries after which one bounded read call returns
/// (the rest wait for the next call): copying a 10 MB entry into the DLQ
/// takes Redis tens of milliseconds, and a script holds Redis while it runs.
pub const DROP_BUDGET_BYTES: usize = 16 * 1024 * 1024;

/// One entry that the bounded read dead-lettered inside Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedEntry {
    pub id: String,
    /// Size of its `data` field, in bytes.
    pub data_bytes: u64,
    /// Size of its other fields (names and values), in bytes.
    pub other_bytes: u64,
}

/// What one bounded read returned.
#[derive(Debug, Default, PartialEq)]
pub struct BoundedRead {
    /// Entries small enough to be read, as XREADGROUP returns them
    /// (including deleted ones, with no fields, from own pending reads).
    pub entries: Vec<StreamEntry>,
    /// Entries too large to be read: already dead-lettered and acknowledged.
    pub dropped: Vec<DroppedEntry>,
}

impl BoundedRead {
    /// The id of the last entry the read went past, kept or dropped (the
    /// cursor for paging through own pending entries).
    pub fn last_id(&self) -> Option<&str> {
        let kept = self.entries.last().map(|e| e.id.as_str());
        let dropped = self.dropped.last().map(|d| d.id.as_str());
        match (kept, dropped) {
            (Some(a), Some(b)) => Some(if stream_id_less(a, b) { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Whether the read found nothing at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.dropped.is_empty()
    }
}

/// Parses the script's reply: `{kept entries, {id, data bytes, other
/// bytes, ...}}`.
pub fn parse_bounded_read(v: Value) -> BoundedRead {
    let Value::Array(parts) = v else {
        return BoundedRead::default();
    };
    let mut parts = parts.into_iter();
    let entries = parts.next().map(entries_from).unwrap_or_default();
    let dropped = match parts.next() {
        Some(Value::Array(flat)) => flat
            .chunks(3)
            .filter_map(|c| {
                let id = String::from_utf8(bytes_of(c.first()?)?).ok()?;
                let num = |v: &Value| match v {
                    Value::Int(n) => u64::try_from(*n).ok(),
                    other => String::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
                };
                Some(DroppedEntry {
                    id,
                    data_bytes: num(c.get(1)?)?,
                    other_bytes: num(c.get(2)?)?,
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    BoundedRead { entries, dropped }
}

/// Everything one call of the script needs.
pub struct BoundedReadArgs<'a> {
    pub stream: &'a str,
    pub dlq: &'a str,
    pub group: &'a str,
    pub consumer: &'a str,
    pub count: usize,
    pub max_data_bytes: usize,
    pub max_side_bytes: usize,
    pub delete_acked: bool,
}

/// Reads up to `count` entries from `start` (`>` for new ones, or a cursor
/// into our own pending entries) without blocking.
pub async fn read_bounded(
    script: &redis::Script,
    conn: &mut RedisConn,
    args: &BoundedReadArgs<'_>,
    start: &str,
) -> redis::RedisResult<BoundedRead> {
    let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let v: Value = script
        .key(args.stream)
        .key(args.dlq)
        .arg(args.group)
        .arg(args.consumer)
        .arg(args.count)
        .arg(start)
        .arg(args.max_data_bytes)
        .arg(args.max_side_bytes)
        .arg(failed_at)
        .arg(if args.delete_acked { "1" } else { "0" })
        .arg(DROP_BUDGET_BYTES)
        .invoke_async(conn)
        .await?;
    Ok(parse_bounded_read(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn bounded_read_replies_parse_kept_and_dropped_entries_and_the_cursor() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![bulk("data"), bulk("{}")]),
            ])]),
            Value::Array(vec![
                bulk("8-0"),
                Value::Int(10_485_760),
                Value::Int(12),
                bulk("10-1"),
                Value::Int(5),
                Value::Int(20_000),
            ]),
        ]);
        let read = parse_bounded_read(reply);
        assert_eq!(read.entries.len(), 1);
        assert_eq!(read.entries[0].field("data"), Some(&b"{}"[..]));
        assert_eq!(
            read.dropped,
            vec![
                DroppedEntry {
                    id: "8-0".into(),
                    data_bytes: 10_485_760,
                    other_bytes: 12
                },
                DroppedEntry {
                    id: "10-1".into(),
                    data_bytes: 5,
                    other_bytes: 20_000
                },
            ]
        );
        // The cursor is the highest id seen, compared as numbers
        // ("7-0" > "10-1" as text).
        assert_eq!(read.last_id(), Some("10-1"));
        // An empty script reply (nothing new) is an empty read.
        let empty = parse_bounded_read(Value::Array(vec![
            Value::Array(vec![]),
            Value::Array(vec![]),
        ]));
        assert!(empty.is_empty());
        assert_eq!(empty.last_id(), None);
    }
}
