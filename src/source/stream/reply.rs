//! Parsing Redis stream replies (XREADGROUP, XAUTOCLAIM, XPENDING, XRANGE)
//! into entries. Pure: replies are consumed, not copied, because a read
//! batch is the worker's largest allocation.

use std::collections::HashMap;

use redis::Value;

/// One stream entry as read: its id and fields, or `None` fields when the
/// entry was deleted (trimmed) while pending.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl StreamEntry {
    /// The value of a field, as raw bytes.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// Moves a field's value out (leaving it empty), so the largest field,
    /// `data`, is never copied on its way to validation and the sink.
    pub fn take_field(&mut self, name: &str) -> Option<Vec<u8>> {
        self.fields
            .as_mut()?
            .iter_mut()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| std::mem::take(v))
    }

    /// Bytes of the fields other than the first `data` (names and values).
    pub fn side_bytes(&self) -> usize {
        let Some(fields) = &self.fields else { return 0 };
        let mut seen_data = false;
        fields
            .iter()
            .filter(|(k, _)| {
                let first_data = k == b"data" && !seen_data;
                seen_data |= first_data;
                !first_data
            })
            .map(|(k, v)| k.len() + v.len())
            .sum()
    }
}

/// Moves the bytes out of a reply value.
pub(super) fn take_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Copies the bytes of a borrowed reply value (small values only).
pub(super) fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn id_of(v: Value) -> Option<String> {
    String::from_utf8(take_bytes(v)?).ok()
}

/// Turns one `[id, [field, value, ...] | nil]` entry into a [`StreamEntry`].
fn entry_from(v: Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = id_of(parts.next()?)?;
    let fields = match parts.next() {
        Some(Value::Array(kv)) => {
            let mut pairs = Vec::with_capacity(kv.len() / 2);
            let mut kv = kv.into_iter();
            while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                if let (Some(k), Some(v)) = (take_bytes(k), take_bytes(v)) {
                    pairs.push((k, v));
                }
            }
            Some(pairs)
        }
        _ => None,
    };
    Some(StreamEntry { id, fields })
}

/// Turns a list of entries into [`StreamEntry`]s, consuming the reply.
pub fn entries_from(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(items) => items.into_iter().filter_map(entry_from).collect(),
        _ => Vec::new(),
    }
}

/// Parses a list of entries from a borrowed reply (the CLI and tests; the
/// read path uses [`entries_from`], which does not copy).
pub fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    entries_from(v.clone())
}

/// Parses an XREADGROUP reply for one stream (nil when the block timed out).
pub fn parse_read_reply(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => {
                    entries_from(pair.into_iter().nth(1).unwrap_or(Value::Nil))
                }
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(_, v)| entries_from(v))
            .collect(),
        _ => Vec::new(),
    }
}

/// What one XAUTOCLAIM returned.
#[derive(Debug, Default, PartialEq)]
pub struct Claimed {
    /// The cursor for the next call (`0-0`: the scan is complete).
    pub next: String,
    /// Entries now pending on this consumer.
    pub entries: Vec<StreamEntry>,
    /// Ids that were pending but whose entries were deleted (trimmed):
    /// Redis has removed them from the pending list.
    pub deleted: Vec<String>,
}

/// Parses an XAUTOCLAIM reply: `[cursor, entries, deleted ids]`.
pub fn parse_autoclaim_reply(v: Value) -> Claimed {
    let Value::Array(parts) = v else {
        return Claimed {
            next: "0-0".into(),
            ..Claimed::default()
        };
    };
    let mut parts = parts.into_iter();
    let next = parts.next().and_then(id_of).unwrap_or_else(|| "0-0".into());
    let entries = parts.next().map(entries_from).unwrap_or_default();
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.into_iter().filter_map(id_of).collect(),
        _ => Vec::new(),
    };
    Claimed {
        next,
        entries,
        deleted,
    }
}

/// Parses the extended XPENDING reply into delivery counts by id:
/// `[[id, consumer, idle, count], ...]`.
pub fn parse_pending_counts(v: &Value) -> HashMap<String, u64> {
    let Value::Array(rows) = v else {
        return HashMap::new();
    };
    rows.iter()
        .filter_map(|row| {
            let Value::Array(cols) = row else { return None };
            let id = String::from_utf8(bytes_of(cols.first()?)?).ok()?;
            let count = match cols.get(3)? {
                Value::Int(n) => u64::try_from(*n).ok()?,
                _ => return None,
            };
            Some((id, count))
        })
        .collect()
}

/// Orders two stream ids (`ms-seq`) numerically.
pub fn stream_id_less(a: &str, b: &str) -> bool {
    let key = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    key(a) < key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_entries_fields_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("audit:events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("data"), Value::BulkString(vec![0xff, b'{'])]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let mut entries = parse_read_reply(reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].field("data"), Some(&[0xff, b'{'][..]));
        assert_eq!(entries[0].field("name"), None);
        assert_eq!(entries[1].fields, None);
        assert!(parse_read_reply(Value::Nil).is_empty());
        // Taking a field moves its bytes out and leaves the others.
        assert_eq!(entries[0].take_field("data"), Some(vec![0xff, b'{']));
        assert_eq!(entries[0].field("data"), Some(&[][..]));
        assert_eq!(entries[1].take_field("data"), None);
    }

    #[test]
    fn side_bytes_count_every_field_but_the_first_data() {
        let entry = StreamEntry {
            id: "1-0".into(),
            fields: Some(vec![
                (b"data".to_vec(), vec![b' '; 100]),
                (b"name".to_vec(), b"audit.event".to_vec()),
                (b"data".to_vec(), b"xy".to_vec()),
            ]),
        };
        assert_eq!(entry.side_bytes(), 4 + 11 + 4 + 2);
        let deleted = StreamEntry {
            id: "2-0".into(),
            fields: None,
        };
        assert_eq!(deleted.side_bytes(), 0);
    }

    #[test]
    fn autoclaim_replies_parse_cursor_entries_and_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("3-0"),
                Value::Array(vec![bulk("data"), bulk("{}")]),
            ])]),
            Value::Array(vec![bulk("4-0")]),
        ]);
        let claimed = parse_autoclaim_reply(reply);
        assert_eq!(claimed.next, "5-0");
        assert_eq!(claimed.entries[0].id, "3-0");
        assert_eq!(claimed.deleted, vec!["4-0".to_string()]);
    }

    #[test]
    fn stream_ids_order_as_numbers() {
        assert!(stream_id_less("9-1", "10-0"));
        assert!(stream_id_less("10-2", "10-10"));
        assert!(!stream_id_less("10-10", "10-2"));
    }
}
