//! Decoding and validation of arbitrary bytes: must never panic, and every
//! result is either a valid event whose hash is canonical hash v1 of its own
//! stored fields, or a rejection with one of the stable reason codes.
#![no_main]

use audit_worker_fuzz::event::{decode_event, RejectReason, ValidationPolicy};
use audit_worker_fuzz::integrity::{canonical_hash_v1, HmacKey, HmacKeyRing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = chrono::DateTime::parse_from_rfc3339("2025-06-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    // Small limits so the fuzzer reaches the limit checks with small inputs.
    let policy = ValidationPolicy {
        max_event_bytes: 4096,
        max_string_chars: 64,
        max_custom_depth: 3,
        hmac_keys: HmacKeyRing::new(vec![HmacKey::new("k1", "fuzz-secret")]),
        ..Default::default()
    };
    match decode_event(data, &policy, now) {
        Ok(ev) => {
            assert_eq!(ev.hash, canonical_hash_v1(&ev.hashed_fields()));
            assert!(!ev.action.is_empty() && !ev.timestamp_raw.is_empty());
            assert!(!ev.action.contains('\0'));
        }
        Err(rejection) => assert!(RejectReason::ALL.contains(&rejection.reason)),
    }
});
