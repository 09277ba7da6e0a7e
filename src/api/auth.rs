//! Authentication of every API request: the `Authorization: Bearer awk_...`
//! header is turned into the caller's [`ApiKey`] (401 otherwise), and
//! handlers then check its permission (403) and organisation scope.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::keys::{self, ApiKey, OrgScope, Permission};
use super::problem::Problem;
use super::ApiState;

/// The authenticated caller of a request: extracting it is what makes a
/// handler require a valid, unrevoked key.
#[derive(Debug, Clone)]
pub struct Caller(pub ApiKey);

impl Caller {
    /// Refuses with 403 unless the key grants `p`.
    pub fn require(&self, p: Permission) -> Result<(), Problem> {
        if self.0.allows(p) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this API key lacks the {p} permission: ask an administrator for a key that has it"
            )))
        }
    }

    /// The key's organisation scope.
    pub fn scope(&self) -> &OrgScope {
        &self.0.organizations
    }
}

/// The token of a `Bearer` Authorization header (scheme case-insensitive).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        let Some(header) = parts.headers.get(AUTHORIZATION) else {
            state.metrics.auth_failed("missing");
            return Err(Problem::unauthorized(
                "send an API key: Authorization: Bearer awk_... (`audit-worker api-key create` makes one)",
            ));
        };
        let invalid = || {
            state.metrics.auth_failed("invalid");
            Problem::unauthorized(
                "the API key is not valid (unknown, malformed or revoked): use a current key",
            )
        };
        let token = header
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or_else(invalid)?;
        if !keys::well_formed(token) {
            return Err(invalid());
        }
        let hash = keys::token_hash(token);
        if let Some(key) = keys::find_file_key(&state.file_keys, &hash) {
            return Ok(Caller(key.clone()));
        }
        let client = state
            .pool
            .get()
            .await
            .map_err(|e| Problem::unavailable(&crate::db::pool_error_cause(&e)))?;
        match keys::find_by_hash(&**client, &hash).await {
            Ok(Some(key)) if key.revoked_at.is_none() => Ok(Caller(key)),
            Ok(Some(key)) => {
                tracing::info!(key = %key.id, "API request with a revoked key refused");
                state.metrics.auth_failed("revoked");
                Err(Problem::unauthorized(
                    "the API key is not valid (unknown, malformed or revoked): use a current key",
                ))
            }
            Ok(None) => Err(invalid()),
            Err(e) => Err(Problem::unavailable(&crate::db::root_cause(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_other_schemes_refused() {
        assert_eq!(bearer_token("Bearer awk_x"), Some("awk_x"));
        assert_eq!(bearer_token("bearer  awk_x "), Some("awk_x"));
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("awk_x"), None);
    }
}
