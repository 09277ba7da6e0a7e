//! Leaf v2: the canonical encoding of a whole stored record.
//!
//! Leaf v1 was the producer's canonical hash v1, which covers 8 fields; a
//! rewrite of any other stored column went unnoticed. A v2 log entry is the
//! *record digest*: SHA-256 over a versioned, domain-separated RFC 8785
//! (JCS) encoding of every column the worker stores for an event. Personal
//! values enter as salted commitments `SHA-256(salt || value)`, the salts
//! being kept apart from the row, so erasing a value together with its salt
//! later leaves every leaf, checkpoint and proof valid.
//!
//! The encoding (also specified in the README, "Record digest (leaf v2)"):
//!
//! ```text
//! record digest = SHA-256( "audit-worker/record/v2\n" || JCS(record) )
//! leaf hash     = SHA-256( 0x00 || record digest )          (RFC 6962)
//! ```
//!
//! `record` is a JSON object with exactly the keys of [`StoredRecord`]
//! (absent values are `null`) plus `commitments`, the sorted list of the
//! paths whose values were replaced by their commitment (lowercase hex).
//! Pure code: no I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Domain-separation prefix (with the version number) of the v2 encoding.
pub const RECORD_PREFIX_V2: &[u8] = b"audit-worker/record/v2\n";

/// The leaf version of logs whose entries are record digests.
pub const LEAF_VERSION_V2: i16 = 2;

/// The leaf version of the first logs, whose entries were hash v1.
pub const LEAF_VERSION_V1: i16 = 1;

/// Personal fields that are always committed when present.
pub const ALWAYS_PERSONAL: [&str; 4] = [
    "principalId",
    "targetResourceId",
    "sessionContext.ipAddress",
    "sessionContext.userAgent",
];

/// Length of a salt, in bytes.
pub const SALT_LEN: usize = 32;

/// Per-event salts, by field path (`principalId`, `sessionContext.ipAddress`).
pub type Salts = BTreeMap<String, [u8; SALT_LEN]>;

/// Every column the worker stores for an event, as read back from
/// `audit_log`: the input of the record digest. Its text borrows the
/// database row where it can (sealing and `verify` read a million rows,
/// and copying each column into a `String` was a tenth of their CPU).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord<'a> {
    pub idempotency_key: Cow<'a, str>,
    pub event_id: Option<Cow<'a, str>>,
    pub event_time: DateTime<Utc>,
    pub timestamp_raw: Cow<'a, str>,
    pub action: Cow<'a, str>,
    pub status: Cow<'a, str>,
    pub principal_id: Option<Cow<'a, str>>,
    pub organization_id: Option<Cow<'a, str>>,
    pub target_resource_type: Option<Cow<'a, str>>,
    pub target_resource_id: Option<Cow<'a, str>>,
    pub outcome_description: Option<Cow<'a, str>>,
    pub hash: Cow<'a, str>,
    pub hash_algorithm: Cow<'a, str>,
    pub hash_provided: bool,
    pub signature: Option<Cow<'a, str>>,
    pub signature_algorithm: Option<Cow<'a, str>>,
    pub signature_key_id: Option<Cow<'a, str>>,
    pub event_version: Option<Cow<'a, str>>,
    pub correlation_id: Option<Cow<'a, str>>,
    pub data_classification: Option<Cow<'a, str>>,
    pub retention_policy: Option<Cow<'a, str>>,
    pub session_context: Option<Value>,
    pub details: Option<Value>,
    pub source: Cow<'a, str>,
    pub ingested_at: DateTime<Utc>,
}

/// Which fields of an event are personal: the fixed ones plus a configured
/// list of `details.<key>` / `sessionContext.<key>` paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonalFields {
    paths: Vec<String>,
}

impl Default for PersonalFields {
    fn default() -> Self {
        Self {
            paths: ALWAYS_PERSONAL.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl PersonalFields {
    /// The fixed personal fields plus `extra` (setting
    /// `snapshot.personal_fields`). Each extra path must be
    /// `details.<key>` or `sessionContext.<key>`, naming a top-level key.
    pub fn with_extra(extra: &[String]) -> Result<Self, String> {
        let mut me = Self::default();
        for p in extra {
            let ok = match p.split_once('.') {
                Some(("details" | "sessionContext", key)) => !key.is_empty(),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "personal field {p:?} must be details.<key> or sessionContext.<key> \
                     (principalId, targetResourceId, sessionContext.ipAddress and userAgent \
                     are always personal)"
                ));
            }
            if !me.paths.contains(p) {
                me.paths.push(p.clone());
            }
        }
        Ok(me)
    }

    /// The paths, fixed ones first.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// The personal paths that hold a value (not absent, not null) in this
    /// event: the ones that need a salt.
    pub fn present_in(
        &self,
        principal_id: Option<&str>,
        target_resource_id: Option<&str>,
        session_context: Option<&Value>,
        details: Option<&Value>,
    ) -> Vec<&str> {
        self.paths
            .iter()
            .filter(|p| match p.as_str() {
                "principalId" => principal_id.is_some(),
                "targetResourceId" => target_resource_id.is_some(),
                other => {
                    let (container, key) = other.split_once('.').unwrap_or(("", ""));
                    let obj = match container {
                        "details" => details,
                        "sessionContext" => session_context,
                        _ => None,
                    };
                    obj.and_then(|o| o.get(key)).is_some_and(|v| !v.is_null())
                }
            })
            .map(String::as_str)
            .collect()
    }
}

/// Commitments kept for erased paths (`{"principalId": <32 bytes>}`): after
/// a GDPR erasure the value and its salt are gone, so the record digest
/// takes the commitment `SHA-256(salt || value)` as it was when sealed.
pub type KeptCommitments = BTreeMap<String, [u8; 32]>;

/// How each committed path of a record is opened: by its salt (the value
/// is in the row) or, once erased, by its kept commitment.
#[derive(Debug, Clone, Copy)]
pub struct Openings<'a> {
    pub salts: &'a Salts,
    pub kept: &'a KeptCommitments,
}

/// One committed path's opening.
#[derive(Debug, Clone, Copy)]
enum Opening<'a> {
    Salt(&'a [u8; SALT_LEN]),
    Kept(&'a [u8; 32]),
}

impl<'a> Openings<'a> {
    /// Every committed path, in byte order (salted and erased together).
    fn paths(&self) -> Result<Vec<&'a str>, String> {
        let mut all: Vec<&str> = self.salts.keys().map(String::as_str).collect();
        for k in self.kept.keys() {
            if self.salts.contains_key(k) {
                return Err(format!(
                    "{k} has both a salt and an erasure commitment: the salt should have been destroyed"
                ));
            }
            all.push(k);
        }
        all.sort_unstable();
        Ok(all)
    }

    fn get(&self, path: &str) -> Option<Opening<'a>> {
        self.salts
            .get(path)
            .map(Opening::Salt)
            .or_else(|| self.kept.get(path).map(Opening::Kept))
    }

    /// The commitment of `value` at this opening.
    fn commit(o: Opening<'_>, value: &Value) -> Result<[u8; 32], String> {
        match o {
            Opening::Salt(s) => commitment(s, value),
            Opening::Kept(c) => Ok(*c),
        }
    }
}

/// 32 bytes (a salt, a commitment, a digest) from 64 hex digits of either
/// case, without an allocation. It runs for every salt and commitment of
/// every row sealed, verified or erased: `hex::decode` into a `Vec` took
/// about 8% of the sealing CPU, and `hex`'s `decode_to_slice` still 5%
/// (perf profiles), so this uses `const-hex`. That crate also accepts a
/// `0x` prefix, which the length check keeps out: with one, 64 characters
/// hold only 62 digits and decoding them into 32 bytes fails.
pub fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    const_hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Reads kept commitments back (`{"<path>": "<64 hex digits>"}`).
pub fn kept_from_json(v: Option<&Value>) -> Result<KeptCommitments, String> {
    let Some(v) = v else {
        return Ok(KeptCommitments::new());
    };
    let obj = v
        .as_object()
        .ok_or("stored erasure commitments are not a JSON object")?;
    obj.iter()
        .map(|(k, v)| {
            let c = v
                .as_str()
                .and_then(hex32)
                .ok_or_else(|| format!("erasure commitment of {k} is not 64 hex digits"))?;
            Ok((k.clone(), c))
        })
        .collect()
}

/// Draws a fresh random salt for each path.
pub fn new_salts(paths: &[&str]) -> Salts {
    use rand::RngCore;
    let mut rng = rand::thread_rng();
    paths
        .iter()
        .map(|p| {
            let mut s = [0u8; SALT_LEN];
            rng.fill_bytes(&mut s);
            (p.to_string(), s)
        })
        .collect()
}

/// Salts as stored (`{"<path>": "<64 hex digits>"}`).
pub fn salts_to_json(salts: &Salts) -> Value {
    Value::Object(
        salts
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(hex::encode(v))))
            .collect(),
    )
}

/// The same JSON as [`salts_to_json`], as text, written directly: this
/// runs for every ingested event, where building a `Value` and hex-encoding
/// char by char cost about a tenth of the worker's CPU (perf profile).
pub fn salts_json_text(salts: &Salts) -> String {
    let mut out = Vec::with_capacity(2 + salts.len() * (SALT_LEN * 2 + 40));
    out.push(b'{');
    for (i, (path, salt)) in salts.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, path.as_str()).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b":\"");
        let at = out.len();
        out.resize(at + SALT_LEN * 2, 0);
        hex::encode_to_slice(salt, &mut out[at..]).expect("room for twice the salt");
        out.push(b'"');
    }
    out.push(b'}');
    String::from_utf8(out).expect("JSON text and hex digits are UTF-8")
}

/// Reads salts back from their stored text (`audit_salts.salts`, the JSON
/// [`salts_json_text`] writes; `None`: the event has no salts), naming the
/// path of a malformed one. The text is parsed straight into the salts,
/// without a generic JSON value: sealing and `verify` do this for every row.
pub fn salts_from_text(text: Option<&str>) -> Result<Salts, String> {
    let Some(text) = text else {
        return Ok(Salts::new());
    };
    let map: BTreeMap<String, String> = serde_json::from_str(text)
        .map_err(|e| format!("stored salts are not a JSON object of hex strings: {e}"))?;
    map.into_iter()
        .map(|(k, v)| {
            let salt = hex32(&v).ok_or_else(|| format!("salt of {k} is not 64 hex digits"))?;
            Ok((k, salt))
        })
        .collect()
}

/// `SHA-256(salt || value)`: a string value as its UTF-8 bytes, any other
/// JSON value as its JCS encoding.
pub fn commitment(salt: &[u8; SALT_LEN], value: &Value) -> Result<[u8; 32], String> {
    let mut h = Sha256::new();
    h.update(salt);
    match value {
        Value::String(s) => h.update(s.as_bytes()),
        other => h.update(jcs(other)?),
    }
    Ok(h.finalize().into())
}

fn jcs(v: &Value) -> Result<Vec<u8>, String> {
    serde_json_canonicalizer::to_vec(v).map_err(|e| format!("cannot canonicalise: {e}"))
}

/// A timestamp as the encoding writes it: RFC 3339, UTC, `Z`, exactly six
/// fraction digits (PostgreSQL keeps microseconds).
pub fn timestamp_text(t: &DateTime<Utc>) -> String {
    match timestamp_digits(t) {
        Some(b) => std::str::from_utf8(&b).expect("ASCII digits").to_owned(),
        None => t.to_rfc3339_opts(SecondsFormat::Micros, true),
    }
}

/// [`timestamp_text`] as fixed-size bytes (`YYYY-MM-DDTHH:MM:SS.ffffffZ`),
/// for years 0 to 9999 and no leap second; `None` otherwise, where only
/// chrono's own formatting is used. Written by hand because sealing and
/// `verify` write two per record and this fixed shape needs nothing of
/// chrono's general formatter (1% of sealing's CPU in a profile); a
/// property test holds the two equal.
fn timestamp_digits(t: &DateTime<Utc>) -> Option<[u8; 27]> {
    use chrono::{Datelike, Timelike};
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let micros = t.timestamp_subsec_micros();
    if micros >= 1_000_000 {
        return None;
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 6, micros);
    Some(b)
}

fn opt(s: &Option<Cow<'_, str>>) -> Value {
    s.as_ref()
        .map_or(Value::Null, |s| Value::String(s.to_string()))
}

/// The JSON object that is canonicalised: every column, personal values
/// replaced by their commitments. Fails when a salt names a path that has
/// no value in the record (the salts do not belong to it).
pub fn record_object(r: &StoredRecord, salts: &Salts) -> Result<Value, String> {
    record_object_opened(
        r,
        Openings {
            salts,
            kept: &KeptCommitments::new(),
        },
    )
}

/// [`record_object`] of a record some of whose paths were erased: those
/// enter as their kept commitments.
pub fn record_object_opened(r: &StoredRecord, o: Openings<'_>) -> Result<Value, String> {
    let mut m = Map::new();
    let s = |v: &str| Value::String(v.to_owned());
    m.insert("idempotencyKey".into(), s(&r.idempotency_key));
    m.insert("eventId".into(), opt(&r.event_id));
    m.insert("eventTime".into(), s(&timestamp_text(&r.event_time)));
    m.insert("timestamp".into(), s(&r.timestamp_raw));
    m.insert("action".into(), s(&r.action));
    m.insert("status".into(), s(&r.status));
    m.insert("principalId".into(), opt(&r.principal_id));
    m.insert("organizationId".into(), opt(&r.organization_id));
    m.insert("targetResourceType".into(), opt(&r.target_resource_type));
    m.insert("targetResourceId".into(), opt(&r.target_resource_id));
    m.insert("outcomeDescription".into(), opt(&r.outcome_description));
    m.insert("hash".into(), s(&r.hash));
    m.insert("hashAlgorithm".into(), s(&r.hash_algorithm));
    m.insert("hashProvided".into(), Value::Bool(r.hash_provided));
    m.insert("signature".into(), opt(&r.signature));
    m.insert("signatureAlgorithm".into(), opt(&r.signature_algorithm));
    m.insert("signatureKeyId".into(), opt(&r.signature_key_id));
    m.insert("eventVersion".into(), opt(&r.event_version));
    m.insert("correlationId".into(), opt(&r.correlation_id));
    m.insert("dataClassification".into(), opt(&r.data_classification));
    m.insert("retentionPolicy".into(), opt(&r.retention_policy));
    m.insert(
        "sessionContext".into(),
        r.session_context.clone().unwrap_or(Value::Null),
    );
    m.insert("details".into(), r.details.clone().unwrap_or(Value::Null));
    m.insert("source".into(), s(&r.source));
    m.insert("ingestedAt".into(), s(&timestamp_text(&r.ingested_at)));
    let paths = o.paths()?;
    for path in &paths {
        let opening = o.get(path).expect("listed paths have an opening");
        let path = *path;
        let slot = match path.split_once('.') {
            None if path == "principalId" || path == "targetResourceId" => m.get_mut(path),
            Some((c @ ("details" | "sessionContext"), key)) => m
                .get_mut(c)
                .and_then(Value::as_object_mut)
                .and_then(|o| o.get_mut(key)),
            _ => None,
        };
        let slot = slot
            .filter(|v| !v.is_null())
            .ok_or_else(|| format!("a salt is stored for {path}, which holds no value"))?;
        *slot = Value::String(hex::encode(Openings::commit(opening, slot)?));
    }
    m.insert(
        "commitments".into(),
        Value::Array(paths.iter().map(|k| Value::String(k.to_string())).collect()),
    );
    Ok(Value::Object(m))
}

/// The bytes that are hashed: prefix, then the JCS encoding. The reference
/// form of the encoding ([`record_digest`] writes the same bytes directly).
pub fn encode_v2(r: &StoredRecord, salts: &Salts) -> Result<Vec<u8>, String> {
    let mut out = RECORD_PREFIX_V2.to_vec();
    out.extend(jcs(&record_object(r, salts)?)?);
    Ok(out)
}

/// The record digest of a record object as [`record_object`] builds it
/// (and as a v2 proof carries it): lets a proof's reader recompute the leaf
/// from the printed record.
pub fn digest_of_object(record: &Value) -> Result<[u8; 32], String> {
    let mut bytes = RECORD_PREFIX_V2.to_vec();
    bytes.extend(jcs(record)?);
    Ok(Sha256::digest(bytes).into())
}

/// The record digest: the log's entry for the event.
///
/// Sealing and `verify` compute one per event, so this writes the JCS
/// encoding directly: the record's keys in their fixed canonical order,
/// strings escaped by `serde_json` (whose escaping is JCS's), and only
/// `sessionContext` / `details` canonicalised generically.
/// It produces exactly the bytes of [`encode_v2`] (the plain
/// build-a-`Value`-then-canonicalise form, kept as the reference and for
/// proofs, which print the record object) without building the object; unit
/// tests and a property test hold the two together.
pub fn record_digest(r: &StoredRecord, salts: &Salts) -> Result<[u8; 32], String> {
    record_digest_opened(
        r,
        Openings {
            salts,
            kept: &KeptCommitments::new(),
        },
    )
}

/// [`record_digest`] of a record some of whose paths were erased (their
/// kept commitments stand for the values): the digest sealed before the
/// erasure, as long as nothing else changed.
///
/// The encoding is written into one buffer and hashed at once: written
/// straight into the SHA-256 state, its hundred small pieces per record
/// each paid the state's buffering (a profile of sealing showed it).
pub fn record_digest_opened(r: &StoredRecord, o: Openings<'_>) -> Result<[u8; 32], String> {
    let mut bytes = Vec::with_capacity(1024);
    bytes.extend_from_slice(RECORD_PREFIX_V2);
    write_record(&mut bytes, r, o)?;
    Ok(Sha256::digest(&bytes).into())
}

fn no_value(path: &str) -> String {
    format!("a salt is stored for {path}, which holds no value")
}

fn io_err(e: impl std::fmt::Display) -> String {
    format!("cannot canonicalise: {e}")
}

/// Writes `JCS(record_object(r, salts))` without building the object. The
/// keys below are written in JCS order (all ASCII, so byte order); the
/// tests comparing [`record_digest`] with [`encode_v2`] check that list.
fn write_record<W: std::io::Write>(
    w: &mut W,
    r: &StoredRecord,
    salts: Openings<'_>,
) -> Result<(), String> {
    let paths = salts.paths()?;
    for path in &paths {
        let known = match path.split_once('.') {
            None => *path == "principalId" || *path == "targetResourceId",
            Some((c, _)) => c == "details" || c == "sessionContext",
        };
        if !known {
            return Err(no_value(path));
        }
    }
    let mut out = JcsObject::new(w)?;
    out.key("action")?.string(&r.action)?;
    out.key("commitments")?;
    out.raw(b"[")?;
    for (i, path) in paths.iter().enumerate() {
        if i > 0 {
            out.raw(b",")?;
        }
        out.string(path)?;
    }
    out.raw(b"]")?;
    out.key("correlationId")?.opt(&r.correlation_id)?;
    out.key("dataClassification")?.opt(&r.data_classification)?;
    out.key("details")?
        .container("details", r.details.as_ref(), salts, &paths)?;
    out.key("eventId")?.opt(&r.event_id)?;
    out.key("eventTime")?.timestamp(&r.event_time)?;
    out.key("eventVersion")?.opt(&r.event_version)?;
    out.key("hash")?.string(&r.hash)?;
    out.key("hashAlgorithm")?.string(&r.hash_algorithm)?;
    out.key("hashProvided")?
        .raw(if r.hash_provided { b"true" } else { b"false" })?;
    out.key("idempotencyKey")?.string(&r.idempotency_key)?;
    out.key("ingestedAt")?.timestamp(&r.ingested_at)?;
    out.key("organizationId")?.opt(&r.organization_id)?;
    out.key("outcomeDescription")?.opt(&r.outcome_description)?;
    out.key("principalId")?
        .personal("principalId", &r.principal_id, salts)?;
    out.key("retentionPolicy")?.opt(&r.retention_policy)?;
    out.key("sessionContext")?.container(
        "sessionContext",
        r.session_context.as_ref(),
        salts,
        &paths,
    )?;
    out.key("signature")?.opt(&r.signature)?;
    out.key("signatureAlgorithm")?.opt(&r.signature_algorithm)?;
    out.key("signatureKeyId")?.opt(&r.signature_key_id)?;
    out.key("source")?.string(&r.source)?;
    out.key("status")?.string(&r.status)?;
    out.key("targetResourceId")?
        .personal("targetResourceId", &r.target_resource_id, salts)?;
    out.key("targetResourceType")?
        .opt(&r.target_resource_type)?;
    out.key("timestamp")?.string(&r.timestamp_raw)?;
    out.raw(b"}")
}

/// A JCS object being written member by member; the caller gives the keys
/// in canonical order.
struct JcsObject<'w, W> {
    w: &'w mut W,
    first: bool,
}

impl<'w, W: std::io::Write> JcsObject<'w, W> {
    fn new(w: &'w mut W) -> Result<Self, String> {
        w.write_all(b"{").map_err(io_err)?;
        Ok(Self { w, first: true })
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), String> {
        self.w.write_all(b).map_err(io_err)
    }

    /// `,"<key>":` (no comma before the first member). The record's keys
    /// are ASCII letters, which JSON writes as they are.
    fn key(&mut self, k: &str) -> Result<&mut Self, String> {
        debug_assert!(k.bytes().all(|b| b.is_ascii_alphabetic()));
        if !std::mem::take(&mut self.first) {
            self.raw(b",")?;
        }
        self.raw(b"\"")?;
        self.raw(k.as_bytes())?;
        self.raw(b"\":")?;
        Ok(self)
    }

    fn string(&mut self, s: &str) -> Result<(), String> {
        serde_json::to_writer(&mut *self.w, s).map_err(io_err)
    }

    /// A timestamp as [`timestamp_text`] writes it (a JSON string that
    /// needs no escaping).
    fn timestamp(&mut self, t: &DateTime<Utc>) -> Result<(), String> {
        match timestamp_digits(t) {
            Some(b) => {
                self.raw(b"\"")?;
                self.raw(&b)?;
                self.raw(b"\"")
            }
            None => self.string(&timestamp_text(t)),
        }
    }

    fn opt(&mut self, s: &Option<Cow<'_, str>>) -> Result<(), String> {
        match s {
            Some(s) => self.string(s),
            None => self.raw(b"null"),
        }
    }

    fn commitment(&mut self, salt: Opening<'_>, value: &Value) -> Result<(), String> {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(Openings::commit(salt, value)?, &mut hex).expect("64 hex digits");
        self.raw(b"\"")?;
        self.raw(&hex)?;
        self.raw(b"\"")
    }

    /// `principalId` / `targetResourceId`: its commitment when salted.
    fn personal(
        &mut self,
        path: &str,
        v: &Option<Cow<'_, str>>,
        salts: Openings<'_>,
    ) -> Result<(), String> {
        match (salts.get(path), v) {
            (Some(Opening::Kept(c)), Some(_)) => {
                let mut hex = [0u8; 64];
                hex::encode_to_slice(c, &mut hex).expect("64 hex digits");
                self.raw(b"\"")?;
                self.raw(&hex)?;
                self.raw(b"\"")
            }
            (Some(Opening::Salt(salt)), Some(v)) => {
                let mut h = Sha256::new();
                h.update(salt);
                h.update(v.as_bytes());
                let mut hex = [0u8; 64];
                hex::encode_to_slice(h.finalize(), &mut hex).expect("64 hex digits");
                self.raw(b"\"")?;
                self.raw(&hex)?;
                self.raw(b"\"")
            }
            (Some(_), None) => Err(no_value(path)),
            (None, v) => self.opt(v),
        }
    }

    /// `sessionContext` / `details`: canonicalised as a whole, unless some
    /// of its top-level keys are salted; then member by member, in JCS key
    /// order (UTF-16 code units), salted values as their commitments.
    /// `paths` are `salts.paths()`, listed once per record by the caller.
    fn container(
        &mut self,
        name: &str,
        v: Option<&Value>,
        salts: Openings<'_>,
        paths: &[&str],
    ) -> Result<(), String> {
        let salted: Vec<(&str, &str, Opening<'_>)> = paths
            .iter()
            .filter_map(|&path| {
                let key = path.strip_prefix(name)?.strip_prefix('.')?;
                Some((path, key, salts.get(path)?))
            })
            .collect();
        if salted.is_empty() {
            return match v {
                None => self.raw(b"null"),
                Some(v) => serde_json_canonicalizer::to_writer(v, &mut *self.w).map_err(io_err),
            };
        }
        let obj = v.and_then(Value::as_object);
        for (path, key, _) in &salted {
            if obj.and_then(|o| o.get(*key)).is_none_or(Value::is_null) {
                return Err(no_value(path));
            }
        }
        let obj = obj.expect("checked above");
        let mut keys: Vec<&String> = obj.keys().collect();
        keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
        self.raw(b"{")?;
        for (i, k) in keys.into_iter().enumerate() {
            if i > 0 {
                self.raw(b",")?;
            }
            self.string(k)?;
            self.raw(b":")?;
            let value = &obj[k];
            match salted.iter().find(|(_, key, _)| *key == k.as_str()) {
                Some((_, _, salt)) => self.commitment(*salt, value)?,
                None => serde_json_canonicalizer::to_writer(value, &mut *self.w).map_err(io_err)?,
            }
        }
        self.raw(b"}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex32_reads_64_hex_digits_of_either_case_and_nothing_else() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        let lower = hex::encode(bytes);
        assert_eq!(hex32(&lower), Some(bytes));
        assert_eq!(hex32(&lower.to_uppercase()), Some(bytes));
        assert_eq!(hex32(&lower[..62]), None, "31 bytes");
        assert_eq!(hex32(&format!("{lower}00")), None, "33 bytes");
        assert_eq!(hex32(&format!("{}zz", &lower[..62])), None, "not hex");
        assert_eq!(hex32(""), None);
        assert_eq!(hex32(&format!("0x{}", &lower[..62])), None, "0x prefix");
        assert_eq!(hex32(&format!("0x{lower}")), None, "0x prefix");
        assert_eq!(hex32(&format!("0X{}", &lower[..62])), None, "0X prefix");
    }

    #[test]
    fn salts_as_text_are_the_same_json_as_salts_as_values() {
        let salts = new_salts(&["principalId", "sessionContext.ipAddress", "details.\"odd\""]);
        let text: Value = serde_json::from_str(&salts_json_text(&salts)).unwrap();
        assert_eq!(text, salts_to_json(&salts));
        assert_eq!(salts_from_text(Some(&text.to_string())).unwrap(), salts);
        assert_eq!(salts_json_text(&Salts::new()), "{}");
        assert_eq!(
            salts_from_text(Some(&salts_json_text(&salts))).unwrap(),
            salts
        );
        assert_eq!(salts_from_text(None).unwrap(), Salts::new());
    }

    #[test]
    fn stored_salts_text_that_is_not_an_object_of_salts_is_named() {
        let err = salts_from_text(Some("[1]")).unwrap_err();
        assert!(
            err.starts_with("stored salts are not a JSON object"),
            "{err}"
        );
        let err = salts_from_text(Some(r#"{"principalId": "00"}"#)).unwrap_err();
        assert_eq!(err, "salt of principalId is not 64 hex digits");
        // PostgreSQL's rendering of the same object (spaces) reads the same.
        let salts = new_salts(&["principalId"]);
        let spaced = salts_json_text(&salts).replace(':', ": ");
        assert_eq!(salts_from_text(Some(&spaced)).unwrap(), salts);
    }
    use crate::integrity::merkle::leaf_hash;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The record of the known-answer test (the same record is written out
    /// in tests/fixtures/record-v2-vectors.py).
    fn sample() -> (StoredRecord<'static>, Salts) {
        let r = StoredRecord {
            idempotency_key: "evt-1".into(),
            event_id: Some("evt-1".into()),
            event_time: at("2023-10-26T10:30:00Z"),
            timestamp_raw: "2023-10-26T10:30:00.000Z".into(),
            action: "userLogin".into(),
            status: "success".into(),
            principal_id: Some("user-12345".into()),
            organization_id: Some("org-67890".into()),
            target_resource_type: Some("User".into()),
            target_resource_id: Some("user-12345".into()),
            outcome_description: Some("Zoë said \"hi\"\n — 日本語".into()),
            hash: "1a5173f0c32c592cbe9d3c03c2af6ab212b16de1c903bfe2d1f231e926adf2b7".into(),
            hash_algorithm: "SHA-256".into(),
            hash_provided: true,
            signature: Some(
                "8977ba6cd1d4f853a2cd998e83cb9bbc399bc886322e4e75f0e26e3e1fb88c76".into(),
            ),
            signature_algorithm: Some("HMAC-SHA256".into()),
            signature_key_id: Some("k1".into()),
            event_version: Some("1.0".into()),
            correlation_id: None,
            data_classification: Some("PHI".into()),
            retention_policy: Some("7y".into()),
            session_context: Some(json!({
                "sessionId": "s-1", "ipAddress": "192.0.2.7",
                "userAgent": "curl/8", "geolocation": {"country": "DE"}
            })),
            details: Some(json!({"email": "a@example.com", "n": 1.5, "z": [1, 2e21, null]})),
            source: "stream:audit:events:1-0".into(),
            ingested_at: at("2023-10-26T10:30:01.123456Z"),
        };
        let salts: Salts = [
            "principalId",
            "targetResourceId",
            "sessionContext.ipAddress",
            "sessionContext.userAgent",
            "details.email",
        ]
        .iter()
        .enumerate()
        .map(|(i, p)| (p.to_string(), [i as u8 + 1; SALT_LEN]))
        .collect();
        (r, salts)
    }

    #[test]
    fn record_digest_matches_the_independent_known_answer() {
        let (r, salts) = sample();
        let enc = encode_v2(&r, &salts).unwrap();
        let text = String::from_utf8(enc.clone()).unwrap();
        // Values computed once with Python 3's json and hashlib by
        // tests/fixtures/record-v2-vectors.py.
        let v: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/record-v2-vectors.json"))
                .unwrap();
        assert_eq!(text, v["encoding"].as_str().unwrap());
        assert_eq!(
            hex::encode(record_digest(&r, &salts).unwrap()),
            v["recordDigest"].as_str().unwrap()
        );
        assert_eq!(
            hex::encode(leaf_hash(&record_digest(&r, &salts).unwrap())),
            v["leafHash"].as_str().unwrap()
        );
        assert_eq!(
            digest_of_object(&record_object(&r, &salts).unwrap()).unwrap(),
            record_digest(&r, &salts).unwrap()
        );
        assert_eq!(
            hex::encode(commitment(&[1; SALT_LEN], &json!("user-12345")).unwrap()),
            v["principalIdCommitment"].as_str().unwrap()
        );
        // Personal values never appear in the encoding.
        for secret in ["user-12345", "192.0.2.7", "curl/8", "a@example.com"] {
            assert!(!text.contains(secret), "{secret} leaked into the encoding");
        }
    }

    #[test]
    fn every_column_changes_the_digest() {
        let (r, salts) = sample();
        let base = record_digest(&r, &salts).unwrap();
        let mut variants: Vec<StoredRecord> = Vec::new();
        let mut push = |f: &dyn Fn(&mut StoredRecord)| {
            let mut x = r.clone();
            f(&mut x);
            variants.push(x);
        };
        push(&|x| x.idempotency_key.to_mut().push('x'));
        push(&|x| x.event_id = None);
        push(&|x| x.event_time += chrono::Duration::microseconds(1));
        push(&|x| x.timestamp_raw.to_mut().push('x'));
        push(&|x| x.action.to_mut().push('x'));
        push(&|x| x.status = "failure".into());
        push(&|x| x.principal_id = Some("user-2".into()));
        push(&|x| x.organization_id = None);
        push(&|x| x.target_resource_type = None);
        push(&|x| x.target_resource_id = Some("other".into()));
        push(&|x| x.outcome_description = None);
        push(&|x| x.hash.to_mut().replace_range(0..1, "0"));
        push(&|x| x.hash_algorithm = "SHA-512".into());
        push(&|x| x.hash_provided = false);
        push(&|x| x.signature = None);
        push(&|x| x.signature_algorithm = None);
        push(&|x| x.signature_key_id = Some("k2".into()));
        push(&|x| x.event_version = None);
        push(&|x| x.correlation_id = Some("c".into()));
        push(&|x| x.data_classification = Some("PUBLIC".into()));
        push(&|x| x.retention_policy = Some("1y".into()));
        push(&|x| x.session_context.as_mut().unwrap()["ipAddress"] = json!("192.0.2.8"));
        push(&|x| x.session_context.as_mut().unwrap()["sessionId"] = json!("s-2"));
        push(&|x| x.details.as_mut().unwrap()["n"] = json!(1.25));
        push(&|x| x.details.as_mut().unwrap()["email"] = json!("b@example.com"));
        push(&|x| x.source.to_mut().push('x'));
        push(&|x| x.ingested_at += chrono::Duration::microseconds(1));
        assert_eq!(variants.len(), 27);
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(record_digest(v, &salts).unwrap(), base, "variant {i}");
        }
        // Dropping a salt (a commitment turned back into the raw value) or
        // changing one changes the digest too.
        let mut fewer = salts.clone();
        fewer.remove("details.email");
        assert_ne!(record_digest(&r, &fewer).unwrap(), base);
        let mut other = salts.clone();
        other.insert("principalId".into(), [9; SALT_LEN]);
        assert_ne!(record_digest(&r, &other).unwrap(), base);
    }

    /// The digest written directly is the digest of the reference
    /// encoding, for the known-answer record and for the cases where a salt
    /// names a missing, null or unknown value (both refuse).
    #[test]
    fn the_direct_digest_is_the_digest_of_the_reference_encoding() {
        let reference = |r: &StoredRecord, s: &Salts| {
            encode_v2(r, s).map(|b| <[u8; 32]>::from(Sha256::digest(b)))
        };
        let (r, salts) = sample();
        assert_eq!(record_digest(&r, &salts), reference(&r, &salts));
        assert_eq!(
            record_digest(&r, &Salts::new()),
            reference(&r, &Salts::new())
        );
        let mut refused = Vec::new();
        let mut case = |f: &dyn Fn(&mut StoredRecord, &mut Salts)| {
            let (mut r, mut s) = sample();
            f(&mut r, &mut s);
            let (direct, plain) = (record_digest(&r, &s), reference(&r, &s));
            assert_eq!(direct.is_ok(), plain.is_ok(), "{direct:?} vs {plain:?}");
            match direct {
                Ok(_) => assert_eq!(direct, plain),
                Err(e) => refused.push(e),
            }
        };
        case(&|r, _| r.target_resource_id = None);
        case(&|r, _| r.session_context.as_mut().unwrap()["ipAddress"] = Value::Null);
        case(&|r, _| r.details = None);
        case(&|r, _| r.details = Some(json!([1, 2])));
        case(&|_, s| {
            s.insert("details.missing".into(), [7; SALT_LEN]);
        });
        case(&|_, s| {
            s.insert("other.x".into(), [7; SALT_LEN]);
        });
        case(&|_, s| {
            s.insert("details".into(), [7; SALT_LEN]);
        });
        // Accepted shapes: a non-string personal value, keys outside the
        // basic plane (UTF-16 order differs from UTF-8 order), escapes.
        case(&|r, s| {
            r.details = Some(
                json!({"email": {"a": [1, 2.5]}, "\u{10000}": 1, "\u{ff61}": 2, "e\u{301}": "\u{1}\t\\"}),
            );
            s.remove("sessionContext.userAgent");
        });
        case(&|r, _| {
            r.session_context = Some(json!({"ipAddress": 7, "userAgent": true, "zz": null}))
        });
        assert_eq!(refused.len(), 7, "{refused:?}");
    }

    proptest::proptest! {
        /// Any record: the direct digest equals the reference encoding's.
        #[test]
        fn the_direct_digest_agrees_on_any_record(
            strings in proptest::collection::vec(proptest::option::of(".{0,12}"), 12),
            keys in proptest::collection::vec("[a-z\u{80}-\u{10ffff}]{1,4}", 0..5),
            salted in proptest::collection::vec(proptest::bool::ANY, 8),
            n in proptest::num::f64::NORMAL,
        ) {
            let (mut r, _) = sample();
            let s = |i: usize| strings[i].clone();
            let c = |i: usize| s(i).map(Cow::Owned);
            r.event_id = c(0);
            r.principal_id = c(1);
            r.organization_id = c(2);
            r.target_resource_id = c(3);
            r.outcome_description = c(4);
            r.signature = c(5);
            r.correlation_id = c(6);
            r.action = s(7).unwrap_or_default().into();
            r.source = s(8).unwrap_or_default().into();
            let details: Map<String, Value> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), if i % 2 == 0 { json!(s(9 + i % 3)) } else { json!([n, {"k": k}]) }))
                .collect();
            r.details = (!details.is_empty()).then_some(Value::Object(details));
            let mut salts = Salts::new();
            if salted[0] && r.principal_id.is_some() {
                salts.insert("principalId".into(), [1; SALT_LEN]);
            }
            if salted[1] && r.target_resource_id.is_some() {
                salts.insert("targetResourceId".into(), [2; SALT_LEN]);
            }
            for (i, k) in keys.iter().enumerate().take(4) {
                if salted[2 + i] {
                    salts.insert(format!("details.{k}"), [3 + i as u8; SALT_LEN]);
                }
            }
            let direct = record_digest(&r, &salts);
            let plain = encode_v2(&r, &salts).map(|b| <[u8; 32]>::from(Sha256::digest(b)));
            proptest::prop_assert_eq!(direct, plain);
        }
    }

    proptest::proptest! {
        /// The hand-written timestamp is chrono's RFC 3339 text, at any
        /// microsecond from year 0 to 9999 and beyond (where chrono writes it).
        #[test]
        fn timestamps_are_written_as_chrono_writes_them(
            secs in -70_000_000_000i64..300_000_000_000i64,
            micros in 0u32..1_000_000,
        ) {
            let t = DateTime::from_timestamp(secs, micros * 1_000).expect("in chrono's range");
            proptest::prop_assert_eq!(
                timestamp_text(&t),
                t.to_rfc3339_opts(SecondsFormat::Micros, true)
            );
        }
    }

    #[test]
    fn a_salt_without_a_value_is_refused() {
        let (mut r, salts) = sample();
        r.principal_id = None;
        let e = record_digest(&r, &salts).unwrap_err();
        assert!(e.contains("principalId"), "{e}");
    }

    #[test]
    fn personal_fields_are_the_fixed_ones_plus_valid_extras() {
        let p = PersonalFields::with_extra(&["details.email".into()]).unwrap();
        assert_eq!(p.paths().len(), 5);
        for bad in ["email", "details.", "other.x", "principalId.x"] {
            assert!(PersonalFields::with_extra(&[bad.into()]).is_err(), "{bad}");
        }
        let (r, _) = sample();
        let present = p.present_in(
            r.principal_id.as_deref(),
            None,
            r.session_context.as_ref(),
            Some(&json!({"email": null})),
        );
        assert_eq!(
            present,
            vec![
                "principalId",
                "sessionContext.ipAddress",
                "sessionContext.userAgent"
            ]
        );
        let salts = new_salts(&present);
        assert_eq!(salts.len(), 3);
        assert_ne!(salts["principalId"], salts["sessionContext.ipAddress"]);
        let back = salts_from_text(Some(&salts_to_json(&salts).to_string())).unwrap();
        assert_eq!(back, salts);
        assert!(salts_from_text(Some(&json!({"principalId": "zz"}).to_string())).is_err());
    }
}
