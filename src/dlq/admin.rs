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
    conn: &mut redis::aio::ConnectionManager,
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

/// Puts matching dead letters back onto the event stream. Each re-add and
/// the removal from the DLQ happen in one MULTI/EXEC, so a letter is never
/// lost between the two, nor replayed twice by a repeated command.
pub async fn replay(
    conn: &mut redis::aio::ConnectionManager,
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
        let (new_id, _): (String, u64) = redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(stream_key)
            .arg("*")
            .arg("data")
            .arg(&letter.data[..])
            .arg("name")
            .arg(&letter.name)
            .cmd("XDEL")
            .arg(dlq_key)
            .arg(&letter.id)
            .query_async(conn)
            .await?;
        replayed.push((letter, new_id));
    }
    Ok(replayed)
}

/// Removes dead letters older than `age` (by their DLQ entry time); returns
/// how many were removed.
pub async fn purge_older_than(
    conn: &mut redis::aio::ConnectionManager,
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
