//! Property tests (proptest) for the pure decoding and hashing code: the
//! unit tests pin known answers, these check the rules over many generated
//! inputs.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::event::{decode_event, parse_event_object, Field, RejectReason, ValidationPolicy};
use crate::integrity::{canonical_hash_v1, HashedFields};

/// The eight hashed fields as owned optional strings.
type Fields = [Option<String>; 8];

fn as_hashed(f: &Fields) -> HashedFields<'_> {
    HashedFields {
        timestamp: f[0].as_deref(),
        action: f[1].as_deref(),
        status: f[2].as_deref(),
        principal_id: f[3].as_deref(),
        organization_id: f[4].as_deref(),
        target_resource_type: f[5].as_deref(),
        target_resource_id: f[6].as_deref(),
        outcome_description: f[7].as_deref(),
    }
}

/// Normalises a field the way the hash sees it: empty and missing are one.
fn seen(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

fn field() -> impl Strategy<Value = Option<String>> {
    // Any Unicode (control characters, quotes, `|`, `:` included), biased
    // towards short strings so that near-collisions are tried often.
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        ".{0,12}".prop_map(Some),
        "[a|:\"\\\\\u{0}-\u{1f}]{0,6}".prop_map(Some),
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    proptest::array::uniform8(field())
}

fn now() -> DateTime<Utc> {
    "2025-06-01T00:00:00Z".parse().expect("fixed time")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Two field sets hash alike exactly when they agree on every field
    /// (with empty ≡ missing): any change to any hashed field changes the hash.
    #[test]
    fn any_change_to_a_hashed_field_changes_the_hash(a in fields(), b in fields()) {
        let same = a.iter().zip(&b).all(|(x, y)| seen(x) == seen(y));
        prop_assert_eq!(canonical_hash_v1(&as_hashed(&a)) == canonical_hash_v1(&as_hashed(&b)), same);
    }

    /// Changing one field, by one edit, always changes the hash.
    #[test]
    fn a_single_field_edit_changes_the_hash(
        a in fields(),
        which in 0usize..8,
        replacement in ".{1,8}",
    ) {
        let mut b = a.clone();
        let old = b[which].clone().unwrap_or_default();
        b[which] = Some(format!("{old}{replacement}"));
        prop_assert_ne!(canonical_hash_v1(&as_hashed(&a)), canonical_hash_v1(&as_hashed(&b)));
    }

    /// An empty string and a missing field hash alike, in every position.
    #[test]
    fn empty_string_is_missing_in_every_position(a in fields(), which in 0usize..8) {
        let mut empty = a.clone();
        empty[which] = Some(String::new());
        let mut missing = a;
        missing[which] = None;
        prop_assert_eq!(canonical_hash_v1(&as_hashed(&empty)), canonical_hash_v1(&as_hashed(&missing)));
    }

    /// Arbitrary bytes: decoding never panics and any rejection carries a
    /// documented reason code.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_decode(&raw)?;
    }

    /// JSON-shaped input (objects with schema and random keys, any values)
    /// reaches the validation rules beyond the parser; still never panics,
    /// and an accepted event's hash is that of its stored fields.
    #[test]
    fn decoding_arbitrary_json_never_panics(doc in event_like()) {
        check_decode(doc.to_string().as_bytes())?;
    }

    /// The event parser puts each schema key's value in its slot and every
    /// other key in the custom map: exactly what a generic parse of the
    /// same text, taken apart key by key, gives.
    #[test]
    fn the_event_parser_splits_an_object_as_a_generic_parse_does(doc in event_like()) {
        let parsed = parse_event_object(&doc.to_string()).expect("an object without repeated keys");
        let Value::Object(mut rest) = doc else { unreachable!("event_like makes objects") };
        for (field, slot) in Field::ALL.iter().zip(&parsed.fields) {
            let expected = rest.remove(field.name());
            prop_assert_eq!(slot, &expected, "{}", field.name());
        }
        prop_assert_eq!(parsed.custom, rest);
    }

    /// Any JSON value but an object is refused as such.
    #[test]
    fn a_top_level_value_other_than_an_object_is_refused(doc in json_value()) {
        let result = parse_event_object(&doc.to_string());
        if doc.is_object() {
            prop_assert!(result.is_ok());
        } else {
            let refusal = result.expect_err("not an object");
            prop_assert_eq!(refusal.reason, RejectReason::InvalidJson);
            prop_assert_eq!(refusal.message, "event must be a JSON object");
        }
    }
}

fn check_decode(raw: &[u8]) -> Result<(), TestCaseError> {
    let policy = ValidationPolicy {
        max_string_chars: 32,
        ..Default::default()
    };
    match decode_event(raw, &policy, now()) {
        Ok(ev) => {
            prop_assert_eq!(&ev.hash, &canonical_hash_v1(&ev.hashed_fields()));
            prop_assert!(!ev.action.is_empty());
        }
        Err(r) => {
            prop_assert!(RejectReason::ALL.contains(&r.reason));
            prop_assert!(!r.message.is_empty());
        }
    }
    Ok(())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_like() -> impl Strategy<Value = Value> {
    let keys = prop_oneof![
        Just("timestamp".to_string()),
        Just("action".to_string()),
        Just("status".to_string()),
        Just("eventId".to_string()),
        Just("hash".to_string()),
        Just("signature".to_string()),
        Just("hashAlgorithm".to_string()),
        Just("dataClassification".to_string()),
        Just("sessionContext".to_string()),
        ".{0,8}",
    ];
    let value = prop_oneof![
        Just(json!("2025-05-01T10:00:00.000Z")),
        Just(json!("success")),
        Just(json!("SHA-256")),
        Just(json!("PHI")),
        json_value(),
    ];
    proptest::collection::btree_map(keys, value, 0..12).prop_map(|m| {
        let mut obj: serde_json::Map<String, Value> = m.into_iter().collect();
        obj.entry("timestamp")
            .or_insert(json!("2025-05-01T10:00:00.000Z"));
        Value::Object(obj)
    })
}
