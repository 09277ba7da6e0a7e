//! The validation policy from configuration: `[validation]` limits and
//! the `[integrity]` HMAC key ring. Kept apart from [`crate::event`], whose
//! decoding is pure and compiles without the configuration (the fuzz crate
//! builds `event` on its own).

use crate::config::{ConfigError, IntegrityConfig, Secret, ValidationConfig};
use crate::event::ValidationPolicy;
use crate::integrity::{HmacKey, HmacKeyRing};

impl ValidationPolicy {
    /// The policy `[validation]` and `[integrity]` configure (reads the HMAC
    /// key file, if one is set).
    pub fn from_config(
        validation: &ValidationConfig,
        integrity: &IntegrityConfig,
    ) -> Result<Self, ConfigError> {
        Ok(Self::with_keys(validation, &integrity.hmac_key_entries()?))
    }

    /// The policy `[validation]` configures, verifying signatures with
    /// `keys` (id, secret) as [`crate::config::IntegrityConfig::hmac_key_entries`]
    /// read them.
    pub fn with_keys(validation: &ValidationConfig, keys: &[(String, Secret)]) -> Self {
        let v = validation;
        Self {
            max_event_bytes: v.max_event_bytes,
            max_string_chars: v.max_string_chars,
            max_custom_depth: v.max_custom_depth,
            max_event_age: chrono::Duration::days(v.max_event_age_days),
            max_future_skew: chrono::Duration::seconds(v.max_future_skew_secs),
            require_hash: v.require_hash,
            require_signature: v.require_signature,
            hmac_keys: key_ring(keys),
        }
    }
}

/// The HMAC key ring `[integrity]` configures.
pub fn hmac_key_ring(integrity: &IntegrityConfig) -> Result<HmacKeyRing, ConfigError> {
    Ok(key_ring(&integrity.hmac_key_entries()?))
}

/// A key ring of (id, secret) entries, tried in order.
fn key_ring(keys: &[(String, Secret)]) -> HmacKeyRing {
    HmacKeyRing::new(
        keys.iter()
            .map(|(id, secret)| HmacKey::new(id.clone(), secret.expose().as_bytes()))
            .collect(),
    )
}
