//! Restriction of processing (GDPR Art. 18): a flag per subject (table
//! `gdpr_restrictions`), within one organisation or all.
//!
//! "Limited" means, precisely:
//! - the subject's events are still ingested, stored, sealed and verified
//!   (the log must stay complete, and storage is allowed under Art. 18);
//! - exports leave out every event whose principal or target resource is a
//!   restricted subject, unless the export was requested with the `gdpr`
//!   permission (API) or `--include-restricted` (CLI, run by an operator);
//!   requests arriving by the queue never include them;
//! - erasure re-keys the flag to the subject's pseudonym, so it keeps
//!   applying to the erased events.
//!
//! Compliance reports count events, not subjects' data, and are not
//! limited.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

/// The SQL condition (over a query `FROM audit_log`) that is true for
/// events of no restricted subject: exports add it unless the requester
/// may see restricted subjects.
pub const NOT_RESTRICTED: &str = "NOT EXISTS (SELECT 1 FROM gdpr_restrictions r \
     WHERE r.subject_id IN (audit_log.principal_id, audit_log.target_resource_id) \
       AND r.organization_id IN ('', COALESCE(audit_log.organization_id, '')))";

/// A restriction as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Restriction {
    /// `None`: every organisation.
    pub organization_id: Option<String>,
    pub subject_id: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

fn org_key(org: Option<&str>) -> &str {
    org.unwrap_or("")
}

/// Flags a subject (again: the reason is updated).
pub async fn restrict(
    client: &impl GenericClient,
    org: Option<&str>,
    subject: &str,
    reason: &str,
    by: &str,
) -> Result<Restriction, String> {
    super::check_text("subjectId", subject)?;
    super::check_text("reason", reason)?;
    if let Some(org) = org {
        super::check_text("organizationId", org)?;
    }
    let row = client
        .query_one(
            "INSERT INTO gdpr_restrictions (organization_id, subject_id, reason, created_by)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (organization_id, subject_id) DO UPDATE SET reason = EXCLUDED.reason
             RETURNING created_at, created_by, reason",
            &[&org_key(org), &subject, &reason.trim(), &by],
        )
        .await
        .map_err(|e| format!("database: {e}"))?;
    Ok(Restriction {
        organization_id: org.map(str::to_owned),
        subject_id: subject.to_owned(),
        reason: row.get(2),
        created_at: row.get(0),
        created_by: row.get(1),
    })
}

/// Lifts a subject's restriction; whether there was one.
pub async fn lift(
    client: &impl GenericClient,
    org: Option<&str>,
    subject: &str,
) -> Result<bool, String> {
    client
        .execute(
            "DELETE FROM gdpr_restrictions WHERE organization_id = $1 AND subject_id = $2",
            &[&org_key(org), &subject],
        )
        .await
        .map(|n| n > 0)
        .map_err(|e| format!("database: {e}"))
}

/// The restrictions visible in `orgs` (`None`: all).
pub async fn list(
    client: &impl GenericClient,
    orgs: Option<&[String]>,
) -> Result<Vec<Restriction>, String> {
    let orgs: Option<Vec<String>> = orgs.map(<[String]>::to_vec);
    let rows = client
        .query(
            "SELECT organization_id, subject_id, reason, created_at, created_by
               FROM gdpr_restrictions
              WHERE $1::text[] IS NULL OR organization_id = '' OR organization_id = ANY ($1)
              ORDER BY created_at, subject_id",
            &[&orgs],
        )
        .await
        .map_err(|e| format!("database: {e}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let org: String = r.get(0);
            Restriction {
                organization_id: (!org.is_empty()).then_some(org),
                subject_id: r.get(1),
                reason: r.get(2),
                created_at: r.get(3),
                created_by: r.get(4),
            }
        })
        .collect())
}
