//! Canonical hash v1 over arbitrary field values: never panics, the
//! canonical string is exactly eight `name:value` parts (the `|` separator
//! cannot be smuggled in, because values are JSON strings), each value
//! renders as the JSON string it came from, and empty equals missing.
#![no_main]

use audit_worker_fuzz::integrity::{canonical_hash_v1, canonical_string_v1, HashedFields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Eight values separated by 0xFF-free splits: use U+001E (record separator)
    // as the fuzzer's field delimiter; missing parts stay None.
    let mut parts = text
        .split('\u{1e}')
        .map(Some)
        .chain(std::iter::repeat(None));
    let mut next = || parts.next().flatten();
    let fields = HashedFields {
        timestamp: next(),
        action: next(),
        status: next(),
        principal_id: next(),
        organization_id: next(),
        target_resource_type: next(),
        target_resource_id: next(),
        outcome_description: next(),
    };
    let canonical = canonical_string_v1(&fields);
    let hash = canonical_hash_v1(&fields);
    assert_eq!(hash.len(), 64);
    assert!(hash
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    // Parse the canonical string back: names in order, each value JSON null
    // or a JSON string equal to the (non-empty) input.
    let expected = [
        ("action", fields.action),
        ("organizationId", fields.organization_id),
        ("outcomeDescription", fields.outcome_description),
        ("principalId", fields.principal_id),
        ("status", fields.status),
        ("targetResourceId", fields.target_resource_id),
        ("targetResourceType", fields.target_resource_type),
        ("timestamp", fields.timestamp),
    ];
    let mut rest = canonical.as_str();
    for (i, (name, value)) in expected.iter().enumerate() {
        if i > 0 {
            rest = rest.strip_prefix('|').expect("separator");
        }
        rest = rest
            .strip_prefix(name)
            .expect("name")
            .strip_prefix(':')
            .expect("colon");
        match value.filter(|v| !v.is_empty()) {
            None => {
                rest = rest
                    .strip_prefix("null")
                    .expect("null for empty or missing")
            }
            Some(v) => {
                // A JSON string delimits itself, so the stream parser stops
                // right after its closing quote.
                let mut de =
                    serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
                let parsed = de.next().expect("a JSON value").expect("valid JSON");
                assert_eq!(parsed.as_str(), Some(v));
                rest = &rest[de.byte_offset()..];
            }
        }
    }
    assert!(rest.is_empty());

    // Empty string and missing hash alike.
    let emptied = HashedFields {
        principal_id: fields.principal_id.filter(|v| !v.is_empty()),
        ..fields
    };
    assert_eq!(canonical_hash_v1(&emptied), hash);
});
