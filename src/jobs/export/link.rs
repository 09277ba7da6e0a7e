//! Signed download links.
//!
//! A link is `/exports/<id>/download?expires=<unix seconds>&signature=<hex>`
//! where the signature is HMAC-SHA256 over `"<id>\n<expires>"` keyed with
//! the dedicated link secret (`export.link_secret`). The id is only ever a
//! key for looking the job up in the database, never part of a path, and
//! the MAC is compared in constant time. For S3 storage the store's own
//! presigned URL is used instead, so downloads need not pass the worker.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use object_store::path::Path;
use object_store::signer::Signer;
use sha2::Sha256;

use crate::config::Secret;
use crate::storage::Storage;

type HmacSha256 = Hmac<Sha256>;

/// The link signing key. `Debug` never shows it.
#[derive(Clone)]
pub struct LinkSigner {
    secret: Secret,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner([redacted])")
    }
}

impl LinkSigner {
    /// Wraps the configured secret.
    pub fn new(secret: Secret) -> Self {
        Self { secret }
    }

    fn mac(&self, id: &str, expires: i64) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(self.secret.expose().as_bytes())
            .expect("HMAC takes any key size");
        mac.update(id.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signature (lowercase hex) for job `id` valid until `expires`.
    pub fn sign(&self, id: &str, expires: i64) -> String {
        hex::encode(self.mac(id, expires).finalize().into_bytes())
    }

    /// The path and query of a download link.
    pub fn link(&self, id: &str, expires: DateTime<Utc>) -> String {
        self.link_at(&format!("/exports/{id}/download"), id, expires)
    }

    /// The path and query of a link to `path`, signed over `signed_id`
    /// (exports sign their job id; other artifacts sign an id with a `/`
    /// in it, which no export id has, so one never opens the other).
    pub fn link_at(&self, path: &str, signed_id: &str, expires: DateTime<Utc>) -> String {
        let expires = expires.timestamp();
        format!(
            "{path}?expires={expires}&signature={}",
            self.sign(signed_id, expires)
        )
    }

    /// Whether `signature_hex` signs (`id`, `expires`) and `expires` is not
    /// past `now`. The MAC comparison is constant-time (`verify_slice`).
    pub fn verify(&self, id: &str, expires: i64, signature_hex: &str, now: DateTime<Utc>) -> bool {
        let Ok(signature) = hex::decode(signature_hex) else {
            return false;
        };
        let valid = self.mac(id, expires).verify_slice(&signature).is_ok();
        valid && expires >= now.timestamp()
    }
}

/// A download link for `key`: an S3 presigned URL when the store is S3,
/// otherwise the worker's signed link (prefixed with `base_url`). `None`
/// when neither is possible (no link secret configured).
pub async fn download_link(
    storage: &Storage,
    signer: Option<&LinkSigner>,
    base_url: &str,
    id: &str,
    key: &str,
    expires: DateTime<Utc>,
) -> Result<Option<String>, object_store::Error> {
    let path = format!("/exports/{id}/download");
    download_link_at(storage, signer, base_url, &path, id, key, expires).await
}

/// [`download_link`] for any artifact: `path` is the worker's route to it
/// and `signed_id` what its signature covers (see [`LinkSigner::link_at`]).
pub async fn download_link_at(
    storage: &Storage,
    signer: Option<&LinkSigner>,
    base_url: &str,
    path: &str,
    signed_id: &str,
    key: &str,
    expires: DateTime<Utc>,
) -> Result<Option<String>, object_store::Error> {
    if let Some(s3) = &storage.s3 {
        // SigV4 presigned URLs live at most 7 days.
        let ttl = (expires - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(7 * 24 * 3600));
        let url = s3
            .signed_url(object_store::signer::Method::GET, &Path::from(key), ttl)
            .await?;
        return Ok(Some(url.to_string()));
    }
    Ok(signer.map(|s| {
        format!(
            "{}{}",
            base_url.trim_end_matches('/'),
            s.link_at(path, signed_id, expires)
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_verify_and_tampering_or_expiry_is_refused() {
        let s = LinkSigner::new(Secret::from("link-secret".to_owned()));
        let now = Utc::now();
        let exp = now.timestamp() + 60;
        let sig = s.sign("job-1", exp);
        assert!(s.verify("job-1", exp, &sig, now));
        assert!(!s.verify("job-2", exp, &sig, now));
        assert!(!s.verify("job-1", exp + 1, &sig, now));
        assert!(!s.verify("job-1", exp, &sig[..60], now));
        assert!(!s.verify("job-1", exp, "zz", now));
        let other = LinkSigner::new(Secret::from("other".to_owned()));
        assert!(!other.verify("job-1", exp, &sig, now));
        let past = now.timestamp() - 1;
        assert!(!s.verify("job-1", past, &s.sign("job-1", past), now));
        assert!(!format!("{s:?}").contains("link-secret"));
    }
}
