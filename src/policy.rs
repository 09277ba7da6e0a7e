//! The validation policy from configuration: `[validation]` limits and
//! the `[integrity]` HMAC key ring. Kept apart from [`crate::event`], whose
//! decoding is pure and compiles without the configuration (the fuzz crate
//! builds `event` on its own).

use crate::config::{ConfigError, IntegrityConfig, ValidationConfig};
use crate::event::ValidationPolicy;
use crate::integrity::{HmacKey, HmacKeyRing};

impl ValidationPolicy {
    /// The policy `[validation]` and `[integrity]` configure (reads the HMAC
    /// key file, if one is set).
    pub fn from_config(
        validation: &ValidationConfig,
        integrity: &IntegrityConfig,
    ) -> Result<Self, ConfigError> {
        let v = validation;
        Ok(Self {
            max_event_bytes: v.max_event_bytes,
            max_string_chars: v.max_string_chars,
            max_custom_depth: v.max_custom_depth,
            max_event_age: chrono::Duration::days(v.max_event_age_days),
            max_future_skew: chrono::Duration::seconds(v.max_future_skew_secs),
            require_hash: v.require_hash,
            require_signature: v.require_signature,
            hmac_keys: hmac_key_ring(integrity)?,
        })
    }
}

/// The HMAC key ring `[integrity]` configures.
pub fn hmac_key_ring(integrity: &IntegrityConfig) -> Result<HmacKeyRing, ConfigError> {
    Ok(HmacKeyRing::new(
        integrity
            .hmac_key_entries()?
            .into_iter()
            .map(|(id, secret)| HmacKey::new(id, secret.expose().as_bytes()))
            .collect(),
    ))
}
