//! Canonical hash v1, byte-compatible with the smart-logs audit SDK.
//!
//! The producer hashes eight fields of the event; we must reproduce its
//! exact bytes, so the rendering follows JavaScript's `JSON.stringify`
//! (which `serde_json` matches for strings: `\"`, `\\`, `\b \f \n \r \t`,
//! other control characters as lowercase `\u00xx`, everything else as is).

use sha2::{Digest, Sha256};

/// The eight fields covered by canonical hash v1, as the producer sent them.
///
/// A missing field and an empty string both hash as JSON `null`; that is the
/// SDK's rule, and why the stored row keeps `""` and `NULL` apart but the
/// hash does not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashedFields<'a> {
    pub timestamp: Option<&'a str>,
    pub action: Option<&'a str>,
    pub status: Option<&'a str>,
    pub principal_id: Option<&'a str>,
    pub organization_id: Option<&'a str>,
    pub target_resource_type: Option<&'a str>,
    pub target_resource_id: Option<&'a str>,
    pub outcome_description: Option<&'a str>,
}

impl<'a> HashedFields<'a> {
    /// The fields in code-unit order of their names, which is the order the
    /// canonical string uses.
    fn sorted(&self) -> [(&'static str, Option<&'a str>); 8] {
        [
            ("action", self.action),
            ("organizationId", self.organization_id),
            ("outcomeDescription", self.outcome_description),
            ("principalId", self.principal_id),
            ("status", self.status),
            ("targetResourceId", self.target_resource_id),
            ("targetResourceType", self.target_resource_type),
            ("timestamp", self.timestamp),
        ]
    }
}

/// Renders the canonical string that canonical hash v1 is taken over:
/// `name:<JSON value>` for each field in sorted order, joined with `|`.
pub fn canonical_string_v1(fields: &HashedFields<'_>) -> String {
    String::from_utf8(canonical_bytes_v1(fields)).expect("JSON text of strings is UTF-8")
}

/// [`canonical_string_v1`] as bytes, written into one buffer: every
/// ingested event and every row `verify` reads is hashed this way.
fn canonical_bytes_v1(fields: &HashedFields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (i, (name, value)) in fields.sorted().into_iter().enumerate() {
        if i > 0 {
            out.push(b'|');
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        match value.filter(|v| !v.is_empty()) {
            None => out.extend_from_slice(b"null"),
            Some(v) => {
                serde_json::to_writer(&mut out, v).expect("writing a &str to a Vec cannot fail")
            }
        }
    }
    out
}

/// Canonical hash v1: lowercase hex SHA-256 of the canonical string.
pub fn canonical_hash_v1(fields: &HashedFields<'_>) -> String {
    let mut hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(canonical_bytes_v1(fields)), &mut hex)
        .expect("64 hex digits for 32 bytes");
    std::str::from_utf8(&hex)
        .expect("hex digits are ASCII")
        .to_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::Value;

    /// The test vectors every implementation of the contract must reproduce
    /// (tests/fixtures/integrity-vectors.json).
    pub(crate) fn fixtures() -> Value {
        serde_json::from_str(include_str!("../../tests/fixtures/integrity-vectors.json"))
            .expect("fixtures parse")
    }

    pub(crate) fn fields_of(event: &Value) -> HashedFields<'_> {
        let s = |k: &str| event.get(k).and_then(Value::as_str);
        HashedFields {
            timestamp: s("timestamp"),
            action: s("action"),
            status: s("status"),
            principal_id: s("principalId"),
            organization_id: s("organizationId"),
            target_resource_type: s("targetResourceType"),
            target_resource_id: s("targetResourceId"),
            outcome_description: s("outcomeDescription"),
        }
    }

    #[test]
    fn canonical_strings_and_hashes_match_every_fixture_vector() {
        let fx = fixtures();
        let cases = fx["canonicalHashV1"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        for case in cases {
            let fields = fields_of(&case["event"]);
            assert_eq!(
                canonical_string_v1(&fields),
                case["canonical"].as_str().unwrap()
            );
            assert_eq!(canonical_hash_v1(&fields), case["hash"].as_str().unwrap());
        }
    }

    #[test]
    fn design_doc_vector_hashes_to_the_published_value() {
        let fx = fixtures();
        let fields = fields_of(&fx["canonicalHashV1"][0]["event"]);
        assert_eq!(
            canonical_hash_v1(&fields),
            "1a5173f0c32c592cbe9d3c03c2af6ab212b16de1c903bfe2d1f231e926adf2b7"
        );
    }

    #[test]
    fn empty_string_and_missing_field_hash_alike() {
        let a = HashedFields {
            timestamp: Some("t"),
            action: Some("a"),
            status: Some("success"),
            principal_id: Some(""),
            ..Default::default()
        };
        let b = HashedFields {
            principal_id: None,
            ..a
        };
        assert_eq!(canonical_hash_v1(&a), canonical_hash_v1(&b));
    }

    #[test]
    fn control_characters_render_as_lowercase_unicode_escapes() {
        let f = HashedFields {
            action: Some("\u{1f}\u{7f}\u{8}"),
            ..Default::default()
        };
        assert!(canonical_string_v1(&f).starts_with("action:\"\\u001f\u{7f}\\b\"|"));
    }
}
