//! The audit event: decoding and validation of the bytes a producer sent.
//!
//! The schema is the one the smart-logs `Audit.log()` SDK emits (README,
//! "The event"). Decoding is pure: given the raw bytes, the limits and the
//! current time it yields either a [`ValidEvent`] ready to store or a
//! [`Rejection`] with a stable [`RejectReason`] code for the dead-letter
//! stream. It never panics on input.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

use crate::integrity::{canonical_hash_v1, HashedFields, HmacKeyRing};

pub use crate::dlq::{RejectReason, Rejection};

/// The limits and integrity policy that validation applies.
#[derive(Debug, Clone)]
pub struct ValidationPolicy {
    /// Largest accepted raw event, in bytes.
    pub max_event_bytes: usize,
    /// Longest accepted string anywhere in the event, in Unicode characters.
    pub max_string_chars: usize,
    /// Deepest accepted nesting of a custom field (a scalar is depth 0,
    /// `{"a":1}` is depth 1).
    pub max_custom_depth: usize,
    /// Oldest accepted event timestamp, relative to now.
    pub max_event_age: Duration,
    /// How far in the future a timestamp may lie (producer clock skew).
    pub max_future_skew: Duration,
    /// Reject events that carry no `hash`.
    pub require_hash: bool,
    /// Reject events that carry no `signature`.
    pub require_signature: bool,
    /// Keys that signatures are verified against.
    pub hmac_keys: HmacKeyRing,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        Self {
            max_event_bytes: 64 * 1024,
            max_string_chars: 10_000,
            max_custom_depth: 3,
            max_event_age: Duration::days(3650),
            max_future_skew: Duration::days(1),
            require_hash: false,
            require_signature: false,
            hmac_keys: HmacKeyRing::default(),
        }
    }
}

/// Allowed values of `status`.
pub const STATUSES: [&str; 3] = ["attempt", "success", "failure"];
/// Allowed values of `dataClassification`.
pub const DATA_CLASSIFICATIONS: [&str; 4] = ["PUBLIC", "INTERNAL", "CONFIDENTIAL", "PHI"];

/// An event that passed validation and integrity checks, in the shape of an
/// `audit_log` row (minus the source identity, which the source adds).
///
/// String fields hold exactly what the producer sent, so the stored row can
/// be re-hashed later; `hash` is the verified (or, when absent, computed)
/// canonical hash v1.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    pub event_id: Option<String>,
    pub event_time: DateTime<Utc>,
    pub timestamp_raw: String,
    pub action: String,
    pub status: String,
    pub principal_id: Option<String>,
    pub organization_id: Option<String>,
    pub target_resource_type: Option<String>,
    pub target_resource_id: Option<String>,
    pub outcome_description: Option<String>,
    pub hash: String,
    /// Whether the producer sent the hash (verified) or we computed it.
    pub hash_provided: bool,
    pub signature: Option<String>,
    pub signature_algorithm: Option<String>,
    /// Id of the HMAC key that verified `signature`; `None` if unsigned or
    /// if no keys are configured (then the signature is stored unverified).
    pub signature_key_id: Option<String>,
    pub event_version: Option<String>,
    pub correlation_id: Option<String>,
    pub data_classification: Option<String>,
    pub retention_policy: Option<String>,
    pub session_context: Option<Value>,
    /// Keys outside the schema (and the SDK's own `details` object), kept as JSONB.
    pub details: Option<Value>,
}

impl ValidEvent {
    /// The fields canonical hash v1 covers, as stored.
    pub fn hashed_fields(&self) -> HashedFields<'_> {
        HashedFields {
            timestamp: Some(&self.timestamp_raw),
            action: Some(&self.action),
            status: Some(&self.status),
            principal_id: self.principal_id.as_deref(),
            organization_id: self.organization_id.as_deref(),
            target_resource_type: self.target_resource_type.as_deref(),
            target_resource_id: self.target_resource_id.as_deref(),
            outcome_description: self.outcome_description.as_deref(),
        }
    }
}

/// Decodes and validates one event.
///
/// Order matters for hostile input: the size limit is checked before any
/// parsing, and serde_json's own recursion limit stops deep nesting before
/// it can exhaust the stack.
pub fn decode_event(
    raw: &[u8],
    policy: &ValidationPolicy,
    now: DateTime<Utc>,
) -> Result<ValidEvent, Rejection> {
    use RejectReason::*;
    if raw.len() > policy.max_event_bytes {
        return Err(Rejection::new(
            TooLarge,
            format!(
                "event is {} bytes, the limit is {} (validation.max_event_bytes)",
                raw.len(),
                policy.max_event_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(raw)
        .map_err(|e| Rejection::new(InvalidJson, format!("event is not valid UTF-8: {e}")))?;
    let mut obj = parse_event_object(text)?;
    check_strings(&obj, policy.max_string_chars)?;

    let timestamp_raw = required_string(&mut obj, Field::Timestamp)?;
    let event_time = parse_timestamp(&timestamp_raw)?;
    if event_time < now - policy.max_event_age || event_time > now + policy.max_future_skew {
        return Err(Rejection::new(
            TimestampOutOfRange,
            format!(
                "timestamp {timestamp_raw} is outside the accepted window \
                 (validation.max_event_age_days / validation.max_future_skew_secs)"
            ),
        ));
    }
    let action = required_string(&mut obj, Field::Action)?;
    let status = required_string(&mut obj, Field::Status)?;
    if !STATUSES.contains(&status.as_str()) {
        return Err(Rejection::new(
            InvalidEvent,
            format!("status {status:?} is not one of attempt, success, failure"),
        ));
    }

    let event_id = optional_string(&mut obj, Field::EventId)?.filter(|s| !s.is_empty());
    let principal_id = optional_string(&mut obj, Field::PrincipalId)?;
    let organization_id = optional_string(&mut obj, Field::OrganizationId)?;
    let target_resource_type = optional_string(&mut obj, Field::TargetResourceType)?;
    let target_resource_id = optional_string(&mut obj, Field::TargetResourceId)?;
    let outcome_description = optional_string(&mut obj, Field::OutcomeDescription)?;
    let provided_hash = optional_string(&mut obj, Field::Hash)?.filter(|s| !s.is_empty());
    let hash_algorithm = optional_string(&mut obj, Field::HashAlgorithm)?;
    let signature = optional_string(&mut obj, Field::Signature)?.filter(|s| !s.is_empty());
    let signature_algorithm = optional_string(&mut obj, Field::Algorithm)?;
    let event_version = optional_string(&mut obj, Field::EventVersion)?;
    let correlation_id = optional_string(&mut obj, Field::CorrelationId)?;
    let data_classification = optional_string(&mut obj, Field::DataClassification)?;
    let retention_policy = optional_string(&mut obj, Field::RetentionPolicy)?;

    if let Some(alg) = hash_algorithm.as_deref() {
        if alg != "SHA-256" {
            return Err(Rejection::new(
                UnsupportedAlgorithm,
                format!("hashAlgorithm {alg:?} is not supported (only SHA-256)"),
            ));
        }
    }
    if let Some(alg) = signature_algorithm.as_deref() {
        if alg != "HMAC-SHA256" {
            return Err(Rejection::new(
                UnsupportedAlgorithm,
                format!("algorithm {alg:?} is not supported (only HMAC-SHA256)"),
            ));
        }
    }
    if let Some(dc) = data_classification.as_deref() {
        if !DATA_CLASSIFICATIONS.contains(&dc) {
            return Err(Rejection::new(
                InvalidEvent,
                format!(
                    "dataClassification {dc:?} is not one of PUBLIC, INTERNAL, CONFIDENTIAL, PHI"
                ),
            ));
        }
    }

    let session_context = match obj.take(Field::SessionContext) {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => {
            check_depth("sessionContext", &v, policy.max_custom_depth)?;
            Some(v)
        }
        Some(_) => {
            return Err(Rejection::new(
                InvalidEvent,
                "sessionContext must be an object",
            ))
        }
    };
    // Whatever is left is custom data; `details` is the SDK's own free-form
    // object and stays nested under its name like any other custom key.
    for (key, v) in &obj.custom {
        check_depth(key, v, policy.max_custom_depth)?;
    }
    let details = (!obj.custom.is_empty()).then_some(Value::Object(obj.custom));

    let mut event = ValidEvent {
        event_id,
        event_time,
        timestamp_raw,
        action,
        status,
        principal_id,
        organization_id,
        target_resource_type,
        target_resource_id,
        outcome_description,
        hash: String::new(),
        hash_provided: provided_hash.is_some(),
        signature,
        signature_algorithm,
        signature_key_id: None,
        event_version,
        correlation_id,
        data_classification,
        retention_policy,
        session_context,
        details,
    };
    let computed = canonical_hash_v1(&event.hashed_fields());
    match provided_hash {
        Some(h) if !h.eq_ignore_ascii_case(&computed) => {
            return Err(Rejection::new(
                HashMismatch,
                format!("hash {h} does not match canonical hash v1 of the event ({computed})"),
            ))
        }
        None if policy.require_hash => {
            return Err(Rejection::new(
                MissingHash,
                "event has no hash and validation.require_hash is on",
            ))
        }
        _ => {}
    }
    event.hash = computed;
    match event.signature.as_deref() {
        Some(sig) if !policy.hmac_keys.is_empty() => {
            match policy.hmac_keys.verify(&event.hash, sig) {
                Some(id) => event.signature_key_id = Some(id.to_owned()),
                None => {
                    return Err(Rejection::new(
                        SignatureMismatch,
                        "signature was not made by any configured HMAC key over the event's hash",
                    ))
                }
            }
        }
        None if policy.require_signature => {
            return Err(Rejection::new(
                MissingSignature,
                "event has no signature and validation.require_signature is on",
            ))
        }
        _ => {}
    }
    Ok(event)
}

/// The schema's top-level keys: each is parsed into a slot of its own
/// rather than into a map it would then be looked up and removed from
/// (that map's lookups were the largest part of decoding's own cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Timestamp,
    Action,
    Status,
    EventId,
    PrincipalId,
    OrganizationId,
    TargetResourceType,
    TargetResourceId,
    OutcomeDescription,
    Hash,
    HashAlgorithm,
    Signature,
    Algorithm,
    EventVersion,
    CorrelationId,
    DataClassification,
    RetentionPolicy,
    SessionContext,
}

impl Field {
    pub(crate) const ALL: [Field; 18] = [
        Field::Timestamp,
        Field::Action,
        Field::Status,
        Field::EventId,
        Field::PrincipalId,
        Field::OrganizationId,
        Field::TargetResourceType,
        Field::TargetResourceId,
        Field::OutcomeDescription,
        Field::Hash,
        Field::HashAlgorithm,
        Field::Signature,
        Field::Algorithm,
        Field::EventVersion,
        Field::CorrelationId,
        Field::DataClassification,
        Field::RetentionPolicy,
        Field::SessionContext,
    ];

    /// The key as the producer writes it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Field::Timestamp => "timestamp",
            Field::Action => "action",
            Field::Status => "status",
            Field::EventId => "eventId",
            Field::PrincipalId => "principalId",
            Field::OrganizationId => "organizationId",
            Field::TargetResourceType => "targetResourceType",
            Field::TargetResourceId => "targetResourceId",
            Field::OutcomeDescription => "outcomeDescription",
            Field::Hash => "hash",
            Field::HashAlgorithm => "hashAlgorithm",
            Field::Signature => "signature",
            Field::Algorithm => "algorithm",
            Field::EventVersion => "eventVersion",
            Field::CorrelationId => "correlationId",
            Field::DataClassification => "dataClassification",
            Field::RetentionPolicy => "retentionPolicy",
            Field::SessionContext => "sessionContext",
        }
    }

    fn from_name(key: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == key)
    }
}

/// The event's top-level object as parsed: the schema's keys in their
/// slots (`Some(Value::Null)` for a key sent as `null`), every other key in
/// `custom`, in key order. No key appears twice.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct EventObject {
    pub(crate) fields: [Option<Value>; Field::ALL.len()],
    pub(crate) custom: Map<String, Value>,
}

impl EventObject {
    /// The value sent for `field`, leaving its slot empty.
    fn take(&mut self, field: Field) -> Option<Value> {
        self.fields[field as usize].take()
    }

    /// Every key sent, with its value: the schema's first, then the rest.
    fn entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        let fields = Field::ALL
            .iter()
            .zip(&self.fields)
            .filter_map(|(f, v)| Some((f.name(), v.as_ref()?)));
        fields.chain(self.custom.iter().map(|(k, v)| (k.as_str(), v)))
    }
}

/// Parses the event's JSON text, refusing duplicate object keys at any depth
/// (serde_json alone silently keeps the last one) and anything but an
/// object at the top.
///
/// serde_json's recursion limit (128) still applies: it is enforced by the
/// deserializer, whatever visitor it drives.
pub(crate) fn parse_event_object(text: &str) -> Result<EventObject, Rejection> {
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = serde::Deserializer::deserialize_any(&mut de, EventObjectVisitor)
        .and_then(|obj| de.end().map(|()| obj));
    parsed.map_err(|e| {
        let text = e.to_string();
        if text.starts_with(DUPLICATE_KEY_MARK) {
            Rejection::new(
                RejectReason::DuplicateKey,
                format!("event is ambiguous: {text}"),
            )
        } else if text.contains("recursion limit") {
            Rejection::new(
                RejectReason::NestingTooDeep,
                "event nests too deeply to parse",
            )
        } else if e.classify() == serde_json::error::Category::Data {
            // The only type error left: the visitor below takes any value
            // inside the object, so it is the top-level value's type.
            Rejection::new(RejectReason::InvalidJson, "event must be a JSON object")
        } else {
            Rejection::new(
                RejectReason::InvalidJson,
                format!("event is not valid JSON: {text}"),
            )
        }
    })
}

fn duplicate_key<E: serde::de::Error>(key: &str) -> E {
    let shown: String = key.chars().take(64).collect();
    E::custom(format!(
        "{DUPLICATE_KEY_MARK}{shown:?}: each key may appear once per object"
    ))
}

/// Builds the [`EventObject`] from the top-level JSON object.
struct EventObjectVisitor;

impl<'de> serde::de::Visitor<'de> for EventObjectVisitor {
    type Value = EventObject;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<EventObject, A::Error> {
        use serde_json::map::Entry;
        let mut obj = EventObject::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let StrictValue(v) = map.next_value()?;
            match key {
                Key::Schema(field) => {
                    let slot = &mut obj.fields[field as usize];
                    if slot.is_some() {
                        return Err(duplicate_key(field.name()));
                    }
                    *slot = Some(v);
                }
                Key::Custom(k) => match obj.custom.entry(k) {
                    Entry::Vacant(e) => {
                        e.insert(v);
                    }
                    Entry::Occupied(e) => return Err(duplicate_key(e.key())),
                },
            }
        }
        Ok(obj)
    }
}

/// A top-level key: one of the schema's, or a custom one.
enum Key {
    Schema(Field),
    Custom(String),
}

/// Reads a top-level key, allocating only for custom keys.
struct KeySeed;

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        Ok(Field::from_name(v).map_or_else(|| Key::Custom(v.to_owned()), Key::Schema))
    }
    fn visit_string<E>(self, v: String) -> Result<Key, E> {
        Ok(Field::from_name(&v).map_or(Key::Custom(v), Key::Schema))
    }
}

/// Start of the error message for a repeated key, used to tell it from
/// syntax errors.
const DUPLICATE_KEY_MARK: &str = "duplicate key ";

/// A JSON value whose objects have no repeated keys; see [`parse_event_object`].
/// Hand-written because serde_json offers no option for it; it mirrors
/// serde_json's own `Value` visitor and differs only in `visit_map`.
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

/// Builds a [`Value`] like serde_json's own visitor, refusing repeated keys.
struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite float from JSON text.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        use serde_json::map::Entry;
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            match obj.entry(key) {
                Entry::Vacant(e) => {
                    e.insert(v);
                }
                Entry::Occupied(e) => return Err(duplicate_key(e.key())),
            }
        }
        Ok(Value::Object(obj))
    }
}

/// Parses the ISO-8601 timestamp. RFC 3339 (what `Date.toISOString()`
/// produces) is required: an offset or `Z` must be present so the instant
/// is unambiguous.
///
/// The instant is truncated to whole microseconds, the precision of
/// PostgreSQL's `timestamptz`: Java and Go clients write nanoseconds, and an
/// event time finer than what the database keeps would never equal the
/// stored one (the sink matches rows by idempotency key and time). The
/// producer's string is kept unchanged in `timestamp_raw`, which is what
/// canonical hash v1 covers.
fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, Rejection> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| truncate_to_micros(t.with_timezone(&Utc)))
        .map_err(|e| {
            Rejection::new(
                RejectReason::InvalidEvent,
                format!(
                    "timestamp {raw:?} is not an ISO-8601 date-time with offset \
                     (like 2024-01-31T12:00:00.000Z): {e}"
                ),
            )
        })
}

/// Drops the sub-microsecond part of `t`, always towards the past (before
/// 1970 too), so the time is exactly one that PostgreSQL stores and returns.
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    t - Duration::nanoseconds(i64::from(nanos % 1_000))
}

fn required_string(obj: &mut EventObject, field: Field) -> Result<String, Rejection> {
    let key = field.name();
    match obj.take(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(Rejection::new(
            RejectReason::InvalidEvent,
            format!("required field {key} is empty"),
        )),
        None | Some(Value::Null) => Err(Rejection::new(
            RejectReason::InvalidEvent,
            format!("required field {key} is missing"),
        )),
        Some(other) => Err(Rejection::new(
            RejectReason::InvalidEvent,
            format!("field {key} must be a string, not {}", type_name(&other)),
        )),
    }
}

fn optional_string(obj: &mut EventObject, field: Field) -> Result<Option<String>, Rejection> {
    match obj.take(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Rejection::new(
            RejectReason::InvalidEvent,
            format!(
                "field {} must be a string, not {}",
                field.name(),
                type_name(&other)
            ),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks every string (keys included) for length and NUL characters.
/// Iterative, so hostile nesting cannot overflow the stack.
fn check_strings(obj: &EventObject, max_chars: usize) -> Result<(), Rejection> {
    let check = |path: &str, s: &str| -> Result<(), Rejection> {
        // A byte length within the limit is a cheap proof the char count is too.
        if s.len() > max_chars && s.chars().count() > max_chars {
            return Err(Rejection::new(
                RejectReason::StringTooLong,
                format!(
                    "{path} is {} characters long, the limit is {max_chars} \
                     (validation.max_string_chars)",
                    s.chars().count()
                ),
            ));
        }
        if s.contains('\0') {
            return Err(Rejection::new(
                RejectReason::NulCharacter,
                format!("{path} contains a NUL character (U+0000), which PostgreSQL cannot store"),
            ));
        }
        Ok(())
    };
    let mut stack: Vec<(&str, &Value)> = Vec::new();
    for (k, v) in obj.entries() {
        check(k, k)?;
        stack.push((k, v));
    }
    while let Some((path, v)) = stack.pop() {
        match v {
            Value::String(s) => check(path, s)?,
            Value::Array(items) => stack.extend(items.iter().map(|i| (path, i))),
            Value::Object(map) => {
                for (k, v) in map {
                    check(path, k)?;
                    stack.push((path, v));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Nesting depth of a JSON value: scalars are 0, a container is one more
/// than its deepest child. Iterative for the same reason as [`check_strings`].
fn depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => max = max.max(d),
        }
        if matches!(v, Value::Array(a) if a.is_empty())
            || matches!(v, Value::Object(o) if o.is_empty())
        {
            max = max.max(d + 1);
        }
    }
    max
}

fn check_depth(key: &str, v: &Value, limit: usize) -> Result<(), Rejection> {
    let d = depth(v);
    if d > limit {
        return Err(Rejection::new(
            RejectReason::NestingTooDeep,
            format!("field {key} nests {d} levels deep, the limit is {limit} (validation.max_custom_depth)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::canonical::tests::fixtures;
    use crate::integrity::HmacKey;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2025-06-01T00:00:00Z".parse().unwrap()
    }

    fn policy() -> ValidationPolicy {
        ValidationPolicy {
            max_event_age: Duration::days(3650),
            ..Default::default()
        }
    }

    fn decode(v: &Value) -> Result<ValidEvent, Rejection> {
        decode_event(v.to_string().as_bytes(), &policy(), now())
    }

    fn reason(v: &Value) -> RejectReason {
        decode(v).expect_err("should be rejected").reason
    }

    fn base() -> Value {
        json!({"timestamp": "2025-05-01T10:00:00.000Z", "action": "user.login", "status": "success"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut e = base();
        e[key] = value;
        e
    }

    #[test]
    fn every_fixture_event_is_accepted_with_its_hash_and_signature_verified() {
        let fx = fixtures();
        for case in fx["canonicalHashV1"].as_array().unwrap() {
            let mut e = case["event"].clone();
            e["hash"] = case["hash"].clone();
            e["signature"] = case["signature"].clone();
            e["hashAlgorithm"] = json!("SHA-256");
            e["algorithm"] = json!("HMAC-SHA256");
            let p = ValidationPolicy {
                hmac_keys: HmacKeyRing::new(vec![HmacKey::new(
                    "k1",
                    case["hmacKey"].as_str().unwrap(),
                )]),
                require_hash: true,
                require_signature: true,
                ..policy()
            };
            let ev = decode_event(e.to_string().as_bytes(), &p, now()).unwrap();
            assert_eq!(ev.hash, case["hash"].as_str().unwrap());
            assert!(ev.hash_provided);
            assert_eq!(ev.signature_key_id.as_deref(), Some("k1"));
        }
    }

    #[test]
    fn fields_are_kept_exactly_as_sent_and_unknown_keys_go_to_details() {
        let mut e = base();
        e["principalId"] = json!("");
        e["outcomeDescription"] = json!("Zoë \"quoted\"\n");
        e["customerTier"] = json!({"level": "gold"});
        e["details"] = json!({"ip": "10.0.0.1"});
        e["sessionContext"] = json!({"sessionId": "s1", "ipAddress": "1.2.3.4"});
        let ev = decode(&e).unwrap();
        assert_eq!(ev.timestamp_raw, "2025-05-01T10:00:00.000Z");
        assert_eq!(ev.principal_id.as_deref(), Some(""));
        assert_eq!(ev.outcome_description.as_deref(), Some("Zoë \"quoted\"\n"));
        assert_eq!(
            ev.details,
            Some(json!({"customerTier": {"level": "gold"}, "details": {"ip": "10.0.0.1"}}))
        );
        assert_eq!(
            ev.session_context,
            Some(json!({"sessionId": "s1", "ipAddress": "1.2.3.4"}))
        );
        assert!(!ev.hash_provided);
        assert_eq!(ev.hash, canonical_hash_v1(&ev.hashed_fields()));
    }

    #[test]
    fn each_invalid_class_gets_its_stable_reason_code() {
        use RejectReason::*;
        assert_eq!(
            decode_event(b"not json", &policy(), now())
                .unwrap_err()
                .reason,
            InvalidJson
        );
        assert_eq!(
            decode_event(b"[1,2]", &policy(), now()).unwrap_err().reason,
            InvalidJson
        );
        assert_eq!(
            decode_event(b"{\"a\":\"\xff\"}", &policy(), now())
                .unwrap_err()
                .reason,
            InvalidJson
        );
        let mut missing = base();
        missing.as_object_mut().unwrap().remove("action");
        assert_eq!(reason(&missing), InvalidEvent);
        assert_eq!(reason(&with("status", json!("done"))), InvalidEvent);
        assert_eq!(reason(&with("status", json!(1))), InvalidEvent);
        assert_eq!(reason(&with("timestamp", json!("yesterday"))), InvalidEvent);
        assert_eq!(
            reason(&with("timestamp", json!("2025-05-01T10:00:00"))),
            InvalidEvent
        );
        assert_eq!(
            reason(&with("timestamp", json!("1999-01-01T00:00:00Z"))),
            TimestampOutOfRange
        );
        assert_eq!(
            reason(&with("timestamp", json!("2030-01-01T00:00:00Z"))),
            TimestampOutOfRange
        );
        assert_eq!(reason(&with("principalId", json!(42))), InvalidEvent);
        assert_eq!(
            reason(&with("dataClassification", json!("SECRET"))),
            InvalidEvent
        );
        assert_eq!(
            reason(&with("hashAlgorithm", json!("MD5"))),
            UnsupportedAlgorithm
        );
        assert_eq!(
            reason(&with("outcomeDescription", json!("x".repeat(10_001)))),
            StringTooLong
        );
        assert_eq!(
            reason(&with("extra", json!({"a": ["x".repeat(10_001)]}))),
            StringTooLong
        );
        assert_eq!(
            reason(&with("extra", json!({"a": {"b": {"c": {"d": 1}}}}))),
            NestingTooDeep
        );
        assert_eq!(reason(&with("action", json!("a\u{0}b"))), NulCharacter);
        assert_eq!(reason(&with("hash", json!("00".repeat(32)))), HashMismatch);
        let big = with("extra", json!("y".repeat(9_000)));
        let mut big = big.to_string().into_bytes();
        let filler = format!(",\"pad\":[{}]}}", vec!["\"zzzzzzzz\""; 7_000].join(","));
        big.truncate(big.len() - 1);
        big.extend_from_slice(filler.as_bytes());
        assert_eq!(
            decode_event(&big, &policy(), now()).unwrap_err().reason,
            TooLarge
        );
    }

    #[test]
    fn a_string_of_exactly_the_limit_and_nesting_of_exactly_the_limit_are_accepted() {
        let e = with("outcomeDescription", json!("é".repeat(10_000)));
        assert!(decode(&e).is_ok());
        let e = with("extra", json!({"a": {"b": {"c": 1}}}));
        assert!(decode(&e).is_ok());
    }

    #[test]
    fn hostile_nesting_is_rejected_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let doc = format!("{{\"timestamp\":\"2025-05-01T10:00:00Z\",\"x\":{deep}}}");
        let p = ValidationPolicy {
            max_event_bytes: 1 << 20,
            ..policy()
        };
        assert_eq!(
            decode_event(doc.as_bytes(), &p, now()).unwrap_err().reason,
            RejectReason::NestingTooDeep
        );
    }

    #[test]
    fn signatures_are_checked_against_the_configured_keys() {
        let key = HmacKey::new("k", "secret");
        let p = ValidationPolicy {
            hmac_keys: HmacKeyRing::new(vec![key.clone()]),
            ..policy()
        };
        let ev = decode(&base()).unwrap();
        let mut signed = base();
        signed["signature"] = json!(key.sign(&ev.hash));
        assert!(decode_event(signed.to_string().as_bytes(), &p, now()).is_ok());
        signed["action"] = json!("user.logout");
        let err = decode_event(signed.to_string().as_bytes(), &p, now()).unwrap_err();
        assert_eq!(err.reason, RejectReason::SignatureMismatch);
    }

    #[test]
    fn require_flags_reject_unhashed_and_unsigned_events() {
        let p = ValidationPolicy {
            require_hash: true,
            ..policy()
        };
        let err = decode_event(base().to_string().as_bytes(), &p, now()).unwrap_err();
        assert_eq!(err.reason, RejectReason::MissingHash);
        let p = ValidationPolicy {
            require_signature: true,
            ..policy()
        };
        let err = decode_event(base().to_string().as_bytes(), &p, now()).unwrap_err();
        assert_eq!(err.reason, RejectReason::MissingSignature);
    }

    #[test]
    fn duplicate_keys_anywhere_are_refused_with_their_own_code() {
        let top =
            br#"{"timestamp":"2025-05-01T10:00:00Z","action":"a","action":"b","status":"success"}"#;
        let err = decode_event(top, &policy(), now()).unwrap_err();
        assert_eq!(err.reason, RejectReason::DuplicateKey);
        assert!(err.message.contains("\"action\""), "{}", err.message);
        let nested = br#"{"timestamp":"2025-05-01T10:00:00Z","action":"a","status":"success","x":[{"k":1,"k":1}]}"#;
        assert_eq!(
            decode_event(nested, &policy(), now()).unwrap_err().reason,
            RejectReason::DuplicateKey
        );
        // Keys that differ only in escaping are the same key once decoded.
        let escaped = br#"{"timestamp":"2025-05-01T10:00:00Z","action":"a","\u0061ction":"b","status":"success"}"#;
        assert_eq!(
            decode_event(escaped, &policy(), now()).unwrap_err().reason,
            RejectReason::DuplicateKey
        );
        let distinct = br#"{"timestamp":"2025-05-01T10:00:00Z","action":"a","status":"success","x":{"k":1},"y":{"k":1}}"#;
        assert!(decode_event(distinct, &policy(), now()).is_ok());
    }

    #[test]
    fn lone_surrogates_huge_numbers_and_trailing_garbage_are_invalid_json() {
        for doc in [
            r#"{"timestamp":"2025-05-01T10:00:00Z","action":"\ud800","status":"success"}"#,
            r#"{"timestamp":"2025-05-01T10:00:00Z","action":"\udc00x","status":"success"}"#,
            r#"{"timestamp":"2025-05-01T10:00:00Z","action":"a","status":"success","n":1e400}"#,
            r#"{"timestamp":"2025-05-01T10:00:00Z","action":"a","status":"success"} {}"#,
        ] {
            let err = decode_event(doc.as_bytes(), &policy(), now()).unwrap_err();
            assert_eq!(err.reason, RejectReason::InvalidJson, "{doc}: {err}");
        }
        // A surrogate pair is one valid character.
        let pair =
            r#"{"timestamp":"2025-05-01T10:00:00Z","action":"\ud83d\ude00","status":"success"}"#;
        assert_eq!(
            decode_event(pair.as_bytes(), &policy(), now())
                .unwrap()
                .action,
            "😀"
        );
    }

    #[test]
    fn nanosecond_timestamps_keep_their_string_and_get_a_microsecond_time() {
        let raw = "2025-05-01T10:00:01.123456789Z";
        let ev = decode(&with("timestamp", json!(raw))).unwrap();
        assert_eq!(ev.timestamp_raw, raw);
        assert_eq!(
            ev.event_time,
            "2025-05-01T10:00:01.123456Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
        assert_eq!(ev.event_time.timestamp_subsec_nanos(), 123_456_000);
        // The hash covers the producer's string, not the truncated time.
        let ms = decode(&with("timestamp", json!("2025-05-01T10:00:01.123456Z"))).unwrap();
        assert_ne!(ev.hash, ms.hash);
        assert_eq!(ev.hash, canonical_hash_v1(&ev.hashed_fields()));
        // Before the epoch too: truncation goes towards the past, whole
        // microseconds stay as they are.
        let t: DateTime<Utc> = "1969-12-31T23:59:59.999999999Z".parse().unwrap();
        assert_eq!(
            truncate_to_micros(t),
            "1969-12-31T23:59:59.999999Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
        let whole: DateTime<Utc> = "2025-05-01T10:00:01.5Z".parse().unwrap();
        assert_eq!(truncate_to_micros(whole), whole);
    }

    #[test]
    fn an_idempotency_conflict_names_the_event_and_both_hashes() {
        let t: DateTime<Utc> = "2025-05-01T10:00:01.123456Z".parse().unwrap();
        let r = Rejection::idempotency_conflict("evt-1", t, "aa11", "bb22");
        assert_eq!(r.reason, RejectReason::IdempotencyConflict);
        assert_eq!(r.reason.code(), "idempotency_conflict");
        assert!(
            r.message.starts_with(
                "event evt-1 at 2025-05-01T10:00:01.123456Z conflicts with the stored event: \
                 stored hash aa11, this event's hash bb22"
            ),
            "{}",
            r.message
        );
    }

    #[test]
    fn every_schema_key_is_parsed_into_its_own_slot_and_other_keys_into_custom() {
        let mut doc = serde_json::Map::new();
        for (i, f) in Field::ALL.iter().enumerate() {
            doc.insert(f.name().to_owned(), json!(i));
        }
        doc.insert("details".into(), json!({"a": 1}));
        let parsed = parse_event_object(&Value::Object(doc).to_string()).unwrap();
        for (i, (f, slot)) in Field::ALL.iter().zip(&parsed.fields).enumerate() {
            assert_eq!(slot, &Some(json!(i)), "{}", f.name());
            assert_eq!(Field::from_name(f.name()), Some(*f));
        }
        assert_eq!(
            parsed.custom,
            json!({"details": {"a": 1}}).as_object().unwrap().clone()
        );
    }

    #[test]
    fn reason_codes_are_unique() {
        let mut codes: Vec<_> = RejectReason::ALL.iter().map(|r| r.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), RejectReason::ALL.len());
    }
}
