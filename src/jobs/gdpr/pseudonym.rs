//! Stable pseudonyms for erased personal values.
//!
//! An erased value is replaced by `pseud:` followed by the lowercase hex of
//! HMAC-SHA256(key, value): the same subject gets the same pseudonym in
//! every event (so an investigation can still link them), and without the
//! key a guessed value cannot be checked against it. Pure code: no I/O.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::config::Secret;

/// What every pseudonym starts with, so a reader sees the value was erased.
pub const PSEUDONYM_PREFIX: &str = "pseud:";

/// Computes pseudonyms with the configured key (`gdpr.pseudonym_key`); its
/// `Debug` never shows the key.
#[derive(Clone)]
pub struct Pseudonymizer {
    key: Secret,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer([redacted])")
    }
}

impl Pseudonymizer {
    /// A pseudonymizer keyed with `key`.
    pub fn new(key: Secret) -> Self {
        Self { key }
    }

    /// The pseudonym of a text value.
    pub fn of_text(&self, value: &str) -> String {
        let mut mac = <Hmac<Sha256>>::new_from_slice(self.key.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(value.as_bytes());
        format!(
            "{PSEUDONYM_PREFIX}{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// The pseudonym of a JSON value: a string by its text, anything else
    /// by its JSON text (personal values are nearly always strings).
    pub fn of_value(&self, value: &Value) -> String {
        match value {
            Value::String(s) => self.of_text(s),
            other => self.of_text(&other.to_string()),
        }
    }

    /// Whether a value is already a pseudonym (erasing it again changes
    /// nothing).
    pub fn is_pseudonym(value: &str) -> bool {
        value.len() == PSEUDONYM_PREFIX.len() + 64
            && value.starts_with(PSEUDONYM_PREFIX)
            && value[PSEUDONYM_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(key: &str) -> Pseudonymizer {
        Pseudonymizer::new(Secret::from(key.to_owned()))
    }

    #[test]
    fn a_pseudonym_is_stable_per_key_and_value_and_hides_the_value() {
        let a = p("key-one-0123456789");
        assert_eq!(a.of_text("user-1"), a.of_text("user-1"));
        assert_ne!(a.of_text("user-1"), a.of_text("user-2"));
        assert_ne!(
            a.of_text("user-1"),
            p("key-two-0123456789").of_text("user-1")
        );
        assert!(!a.of_text("user-1").contains("user-1"));
        assert!(Pseudonymizer::is_pseudonym(&a.of_text("user-1")));
        assert!(!Pseudonymizer::is_pseudonym("user-1"));
        assert_eq!(a.of_value(&json!("user-1")), a.of_text("user-1"));
        assert_eq!(a.of_value(&json!(7)), a.of_text("7"));
        assert!(!format!("{a:?}").contains("key-one"));
    }

    #[test]
    fn the_pseudonym_is_hmac_sha256_of_the_value() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            p("Jefe").of_text("what do ya want for nothing?"),
            "pseud:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
