//! HMAC-SHA256 event signatures with key rotation.
//!
//! The producer signs the lowercase hex canonical hash with a shared secret.
//! Several keys may be configured at once (old and new during a rotation);
//! each carries an id so the stored row records which key verified it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// One configured HMAC secret and the id it is known by.
///
/// `Debug` never prints the secret.
#[derive(Clone)]
pub struct HmacKey {
    id: String,
    secret: Vec<u8>,
}

impl HmacKey {
    /// Creates a key; the id is what rows and logs show, never the secret.
    pub fn new(id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            id: id.into(),
            secret: secret.into(),
        }
    }

    /// The key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Signs `hash_hex` as the producer does: lowercase hex HMAC-SHA256.
    pub fn sign(&self, hash_hex: &str) -> String {
        hex::encode(self.mac(hash_hex).finalize().into_bytes())
    }

    fn mac(&self, hash_hex: &str) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key size");
        mac.update(hash_hex.as_bytes());
        mac
    }

    /// Checks a signature in constant time (`Mac::verify_slice`).
    fn verifies(&self, hash_hex: &str, signature: &[u8]) -> bool {
        self.mac(hash_hex).verify_slice(signature).is_ok()
    }
}

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacKey")
            .field("id", &self.id)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// The set of keys signatures are checked against (rotation: any may match).
#[derive(Debug, Clone, Default)]
pub struct HmacKeyRing {
    keys: Vec<HmacKey>,
}

impl HmacKeyRing {
    /// Builds a ring from keys in the order they are tried.
    pub fn new(keys: Vec<HmacKey>) -> Self {
        Self { keys }
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key the worker signs its own events with (the first configured,
    /// i.e. the newest in a rotation), if any.
    pub fn signing_key(&self) -> Option<&HmacKey> {
        self.keys.first()
    }

    /// The configured key ids (for start-up logs; never the secrets).
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id()).collect()
    }

    /// Returns the id of the key that made `signature_hex` over `hash_hex`,
    /// or `None` if no key did (or the signature is not hex of the right
    /// length). Every key is tried, so timing does not reveal which matched.
    pub fn verify(&self, hash_hex: &str, signature_hex: &str) -> Option<&str> {
        let signature = hex::decode(signature_hex).ok()?;
        let mut found = None;
        for key in &self.keys {
            if key.verifies(hash_hex, &signature) && found.is_none() {
                found = Some(key.id());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::canonical::tests::{fields_of, fixtures};
    use crate::integrity::canonical_hash_v1;

    #[test]
    fn signatures_match_every_fixture_vector() {
        let fx = fixtures();
        for case in fx["canonicalHashV1"].as_array().unwrap() {
            let key = HmacKey::new("k1", case["hmacKey"].as_str().unwrap());
            let hash = canonical_hash_v1(&fields_of(&case["event"]));
            assert_eq!(key.sign(&hash), case["signature"].as_str().unwrap());
            let ring = HmacKeyRing::new(vec![key]);
            assert_eq!(
                ring.verify(&hash, case["signature"].as_str().unwrap()),
                Some("k1")
            );
        }
    }

    #[test]
    fn rotation_accepts_any_configured_key_and_reports_which() {
        let old = HmacKey::new("2024", "old-secret");
        let new = HmacKey::new("2025", "new-secret");
        let ring = HmacKeyRing::new(vec![new.clone(), old.clone()]);
        let hash = "ab".repeat(32);
        assert_eq!(ring.verify(&hash, &old.sign(&hash)), Some("2024"));
        assert_eq!(ring.verify(&hash, &new.sign(&hash)), Some("2025"));
    }

    #[test]
    fn wrong_key_truncated_or_non_hex_signatures_are_rejected() {
        let ring = HmacKeyRing::new(vec![HmacKey::new("k", "secret")]);
        let hash = "cd".repeat(32);
        let good = HmacKey::new("k", "secret").sign(&hash);
        assert!(ring
            .verify(&hash, &HmacKey::new("x", "other").sign(&hash))
            .is_none());
        assert!(ring.verify(&hash, &good[..62]).is_none());
        assert!(ring.verify(&hash, "zz").is_none());
        assert!(ring.verify(&"ef".repeat(32), &good).is_none());
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let key = HmacKey::new("k", "super-secret-value");
        let ring = HmacKeyRing::new(vec![key.clone()]);
        assert!(!format!("{key:?} {ring:?}").contains("super-secret-value"));
    }
}
