//! The operator's side of the dead-letter stream: list, replay and purge
//! (the `audit-worker dlq` commands).

use chrono::Utc;

/// One dead letter as read back from the DLQ stream, for the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    /// The DLQ stream entry id.
    pub id: String,
    pub data: Vec<u8>,
    pub name: String,
    pub reason: String,
    pub error: String,
    pub source: String,
    pub failed_at: String,
}

impl StoredDeadLetter {
    fn from_entry(entry: crate::source::stream::StreamEntry) -> Self {
        let text = |k: &str| {
            entry
                .field(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        Self {
            data: entry.field("data").map(<[u8]>::to_vec).unwrap_or_default(),
            name: text("name"),
            reason: text("reason"),
            error: text("error"),
            source: text("source"),
            failed_at: text("failed_at"),
            id: entry.id,
        }
    }

    /// A short, printable excerpt of the original bytes: invalid UTF-8 and
    /// control characters are escaped so a hostile payload cannot drive the
    /// operator's terminal.
    pub fn excerpt(&self, max_chars: usize) -> String {
        let text = String::from_utf8_lossy(&self.data);
        let mut out: String = text
            .chars()
            .take(max_chars)
            .flat_map(char::escape_default)
            .collect();
        if text.chars().count() > max_chars {
            out.push('…');
        }
        out
    }
}

/// Which dead letters a CLI command applies to.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub reason: Option<String>,
    pub id: Option<String>,
}

impl DeadLetterFilter {
    fn matches(&self, letter: &StoredDeadLetter) -> bool {
        self.reason.as_deref().is_none_or(|r| r == letter.reason)
            && self.id.as_deref().is_none_or(|i| i == letter.id)
    }
}

/// Reads dead letters page by page (the DLQ can be large), keeping those the
/// filter matches, up to `limit`.
pub async fn list(
    conn: &mut crate::source::RedisConn,
    dlq_key: &str,
    filter: &DeadLetterFilter,
    limit: usize,
) -> redis::RedisResult<Vec<StoredDeadLetter>> {
    let mut found = Vec::new();
    let mut start = filter.id.clone().unwrap_or_else(|| "-".to_owned());
    loop {
        let page: redis::Value = redis::cmd("XRANGE")
            .arg(dlq_key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        let entries = crate::source::stream::parse_entries(&page);
        let Some(last) = entries.last().map(|e| e.id.clone()) else {
            break;
        };
        for entry in entries {
            let letter = StoredDeadLetter::from_entry(entry);
            if filter.matches(&letter) {
                found.push(letter);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
        }
        if filter.id.is_some() {
            break;
        }
        start = format!("({last}");
    }
    Ok(found)
}

/// The stream entry field that carries a replayed event's original source
/// identity (`stream:<key>:<entry id>` or `bullmq:<queue>:<job id>`). The
/// stream source uses it, when present, as the event's source and as its
/// idempotency key when the event has no `eventId`, so a replayed event
/// keeps the key it had at first delivery and is never stored twice.
pub const REPLAY_SOURCE_FIELD: &str = "source";

/// The fields of the stream entry that replays `letter`: its original
/// bytes, its job kind and its original source identity (left out when the
/// dead letter has none, e.g. one written by an older version).
pub fn replay_fields(letter: &StoredDeadLetter) -> Vec<(&'static str, &[u8])> {
    let mut fields = vec![("data", &letter.data[..]), ("name", letter.name.as_bytes())];
    if !letter.source.is_empty() {
        fields.push((REPLAY_SOURCE_FIELD, letter.source.as_bytes()));
    }
    fields
}

/// The MULTI/EXEC that replays one dead letter: XADD of its
/// [`replay_fields`] onto `stream_key`, then XDEL from `dlq_key`.
pub fn replay_pipeline(
    letter: &StoredDeadLetter,
    stream_key: &str,
    dlq_key: &str,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let xadd = pipe.cmd("XADD").arg(stream_key).arg("*");
    for (field, value) in replay_fields(letter) {
        xadd.arg(field).arg(value);
    }
    pipe.cmd("XDEL").arg(dlq_key).arg(&letter.id);
    pipe
}

/// Puts matching dead letters back onto the event stream, each with its
/// original source identity (see [`REPLAY_SOURCE_FIELD`]). Each re-add and
/// the removal from the DLQ happen in one MULTI/EXEC, so a letter is never
/// lost between the two, nor replayed twice by a repeated command.
pub async fn replay(
    conn: &mut crate::source::RedisConn,
    dlq_key: &str,
    stream_key: &str,
    filter: &DeadLetterFilter,
) -> redis::RedisResult<Vec<(StoredDeadLetter, String)>> {
    let letters = list(conn, dlq_key, filter, usize::MAX).await?;
    let mut replayed = Vec::new();
    for letter in letters {
        if letter.data.is_empty() {
            tracing::warn!(id = %letter.id, "dead letter has no data to replay; left in place");
            continue;
        }
        let (new_id, _): (String, u64) = replay_pipeline(&letter, stream_key, dlq_key)
            .query_async(conn)
            .await?;
        replayed.push((letter, new_id));
    }
    Ok(replayed)
}

/// Removes dead letters older than `age` (by their DLQ entry time); returns
/// how many were removed.
pub async fn purge_older_than(
    conn: &mut crate::source::RedisConn,
    dlq_key: &str,
    age: std::time::Duration,
) -> redis::RedisResult<u64> {
    let cutoff = Utc::now().timestamp_millis() - age.as_millis() as i64;
    redis::cmd("XTRIM")
        .arg(dlq_key)
        .arg("MINID")
        .arg(format!("{}-0", cutoff.max(0)))
        .query_async(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(source: &str) -> StoredDeadLetter {
        StoredDeadLetter {
            id: "5-0".into(),
            data: b"{\"action\":\"x\"}".to_vec(),
            name: "audit.event".into(),
            reason: "hash_mismatch".into(),
            error: "e".into(),
            source: source.into(),
            failed_at: String::new(),
        }
    }

    #[test]
    fn replay_carries_the_original_source_identity_in_the_source_field() {
        let l = letter("stream:audit:events:1700000000000-3");
        assert_eq!(
            replay_fields(&l),
            vec![
                ("data", &b"{\"action\":\"x\"}"[..]),
                ("name", &b"audit.event"[..]),
                ("source", &b"stream:audit:events:1700000000000-3"[..]),
            ]
        );
        // The pipeline is MULTI, XADD with those fields, XDEL, EXEC.
        let packed = String::from_utf8_lossy(
            &replay_pipeline(&l, "audit:events", "audit:dlq").get_packed_pipeline(),
        )
        .into_owned();
        let at = |s: &str| {
            packed
                .find(s)
                .unwrap_or_else(|| panic!("{s} in {packed:?}"))
        };
        assert!(at("MULTI") < at("XADD") && at("XADD") < at("XDEL") && at("XDEL") < at("EXEC"));
        assert!(at("XADD") < at("$6\r\nsource\r\n$35\r\nstream:audit:events:1700000000000-3"));
        assert!(at("XDEL") < at("audit:dlq\r\n$3\r\n5-0"));
    }

    #[test]
    fn replay_of_a_letter_without_source_adds_no_source_field() {
        let l = letter("");
        let fields = replay_fields(&l);
        assert!(fields.iter().all(|(f, _)| *f != "source"), "{fields:?}");
    }

    #[test]
    fn excerpts_escape_control_characters_and_truncate() {
        let letter = StoredDeadLetter {
            id: "1-0".into(),
            data: b"\x1b[31mred\n\xff and more".to_vec(),
            name: String::new(),
            reason: String::new(),
            error: String::new(),
            source: String::new(),
            failed_at: String::new(),
        };
        let e = letter.excerpt(9);
        assert!(!e.contains('\u{1b}') && !e.contains('\n'), "{e}");
        assert!(e.starts_with("\\u{1b}[31mred\\n"), "{e}");
        assert!(e.ends_with('…'));
    }
}
