//! Legal holds: rows that must be kept whatever else is asked (table
//! `legal_holds`). A hold covers every audit row matching all of its set
//! conditions: organisation, subject (principal or target resource id) and
//! time range `[from, to)`; an unset condition matches everything. While a
//! hold stands (not released), erasure refuses the rows it covers, naming
//! the hold; releasing it lets the erasure proceed.
//!
//! [`covering`] is the pure rule; the rest stores holds. The database
//! function that performs an erasure applies the same rule again under a
//! lock, so a hold placed while an erasure runs is never missed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::{GenericClient, Row};

use super::pseudonym::Pseudonymizer;

/// A legal hold as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub id: String,
    /// `None`: every organisation.
    pub organization_id: Option<String>,
    /// A principal or target resource id; `None`: every subject.
    pub subject_id: Option<String>,
    /// Start of the covered event times (inclusive); `None`: unbounded.
    pub from: Option<DateTime<Utc>>,
    /// End of the covered event times (exclusive); `None`: unbounded.
    pub to: Option<DateTime<Utc>>,
    pub reason: String,
    /// Who answers for the hold.
    pub owner: String,
    pub created_at: DateTime<Utc>,
    /// Who placed it (API key id, or `cli:<user>`).
    pub created_by: String,
    pub released_at: Option<DateTime<Utc>>,
    pub released_by: Option<String>,
}

/// The columns of an audit row a hold looks at.
#[derive(Debug, Clone, Copy)]
pub struct HeldRow<'a> {
    pub organization_id: Option<&'a str>,
    pub principal_id: Option<&'a str>,
    pub target_resource_id: Option<&'a str>,
    pub event_time: DateTime<Utc>,
}

impl Hold {
    /// Whether the hold still stands.
    pub fn active(&self) -> bool {
        self.released_at.is_none()
    }

    /// Whether this hold, if active, covers the row.
    pub fn covers(&self, row: &HeldRow<'_>) -> bool {
        let org = self
            .organization_id
            .as_deref()
            .is_none_or(|o| row.organization_id == Some(o));
        let subject = self
            .subject_id
            .as_deref()
            .is_none_or(|s| row.principal_id == Some(s) || row.target_resource_id == Some(s));
        let from = self.from.is_none_or(|f| row.event_time >= f);
        let to = self.to.is_none_or(|t| row.event_time < t);
        self.active() && org && subject && from && to
    }

    /// The refusal text naming the hold.
    pub fn refusal(&self) -> String {
        format!(
            "legal hold {} ({}; owner {}) covers events of this request: release it \
             (`audit-worker hold release {}` or POST /v1/holds/{}/release) once the legal duty ends",
            self.id, self.reason, self.owner, self.id, self.id
        )
    }
}

/// The first active hold that covers any of the rows.
pub fn covering<'h, 'r>(
    holds: &'h [Hold],
    rows: impl IntoIterator<Item = HeldRow<'r>>,
) -> Option<&'h Hold> {
    let active: Vec<&Hold> = holds.iter().filter(|h| h.active()).collect();
    if active.is_empty() {
        return None;
    }
    for row in rows {
        if let Some(h) = active.iter().find(|h| h.covers(&row)) {
            return Some(h);
        }
    }
    None
}

/// A hold to place.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewHold {
    /// The organisation covered (omit: every organisation).
    #[serde(default)]
    pub organization_id: Option<String>,
    /// The subject covered, a principal or target resource id (omit: every
    /// subject).
    #[serde(default)]
    pub subject_id: Option<String>,
    /// Start of the covered event times (omit: unbounded).
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// End of the covered event times, exclusive (omit: unbounded).
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// Why the data must be kept (a case, a regulation).
    pub reason: String,
    /// Who answers for the hold.
    pub owner: String,
}

impl NewHold {
    /// Checks what the table would refuse, phrased for the user.
    pub fn check(&self) -> Result<(), String> {
        if self.reason.trim().is_empty() {
            return Err("a hold needs a reason (the case or duty it serves)".into());
        }
        if self.owner.trim().is_empty() {
            return Err("a hold needs an owner (who answers for it)".into());
        }
        super::check_text("reason", &self.reason)?;
        super::check_text("owner", &self.owner)?;
        if let (Some(f), Some(t)) = (self.from, self.to) {
            if f >= t {
                return Err("the hold's `from` must be before its `to`".into());
            }
        }
        for (name, v) in [
            ("organizationId", &self.organization_id),
            ("subjectId", &self.subject_id),
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(format!("{name} must not be empty: omit it to cover all"));
            }
            if let Some(v) = v {
                super::check_text(name, v)?;
            }
        }
        Ok(())
    }
}

const HOLD_COLUMNS: &str = "id, organization_id, subject_id, from_time, to_time, reason, owner, \
     created_at, created_by, released_at, released_by";

fn hold_from_row(r: &Row) -> Hold {
    Hold {
        id: r.get(0),
        organization_id: r.get(1),
        subject_id: r.get(2),
        from: r.get(3),
        to: r.get(4),
        reason: r.get(5),
        owner: r.get(6),
        created_at: r.get(7),
        created_by: r.get(8),
        released_at: r.get(9),
        released_by: r.get(10),
    }
}

/// Stores a new hold (checked first) and returns it.
pub async fn place(
    client: &impl GenericClient,
    new: &NewHold,
    created_by: &str,
) -> Result<Hold, HoldError> {
    new.check().map_err(HoldError::BadRequest)?;
    let id = format!("hold_{}", uuid::Uuid::new_v4().simple());
    let row = client
        .query_one(
            &format!(
                "INSERT INTO legal_holds (id, organization_id, subject_id, from_time, to_time, \
                 reason, owner, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 RETURNING {HOLD_COLUMNS}"
            ),
            &[
                &id,
                &new.organization_id,
                &new.subject_id,
                &new.from,
                &new.to,
                &new.reason.trim(),
                &new.owner.trim(),
                &created_by,
            ],
        )
        .await?;
    Ok(hold_from_row(&row))
}

/// Holds visible in `orgs` (`None`: all), newest first; only active ones
/// unless `include_released`. A hold for every organisation is visible to
/// every scope.
pub async fn list(
    client: &impl GenericClient,
    orgs: Option<&[String]>,
    include_released: bool,
) -> Result<Vec<Hold>, HoldError> {
    let orgs: Option<Vec<String>> = orgs.map(<[String]>::to_vec);
    let rows = client
        .query(
            &format!(
                "SELECT {HOLD_COLUMNS} FROM legal_holds
                  WHERE ($1 OR released_at IS NULL)
                    AND ($2::text[] IS NULL OR organization_id IS NULL OR organization_id = ANY ($2))
                  ORDER BY created_at DESC, id"
            ),
            &[&include_released, &orgs],
        )
        .await?;
    Ok(rows.iter().map(hold_from_row).collect())
}

/// The active holds that could cover rows of `org` (`None`: any).
pub async fn active(
    client: &impl GenericClient,
    org: Option<&str>,
) -> Result<Vec<Hold>, HoldError> {
    let rows = client
        .query(
            &format!(
                "SELECT {HOLD_COLUMNS} FROM legal_holds
                  WHERE released_at IS NULL
                    AND ($1::text IS NULL OR organization_id IS NULL OR organization_id = $1)"
            ),
            &[&org],
        )
        .await?;
    Ok(rows.iter().map(hold_from_row).collect())
}

/// One hold by id, if it exists and is visible in `orgs` (`None`: all).
pub async fn get(
    client: &impl GenericClient,
    id: &str,
    orgs: Option<&[String]>,
) -> Result<Option<Hold>, HoldError> {
    let row = client
        .query_opt(
            &format!("SELECT {HOLD_COLUMNS} FROM legal_holds WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row
        .map(|r| hold_from_row(&r))
        .filter(|h| match (orgs, &h.organization_id) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(orgs), Some(o)) => orgs.contains(o),
        }))
}

/// What a released hold keeps of the subject it named, instead of the id:
/// its pseudonym (`pseud:` + HMAC-SHA256 with `gdpr.pseudonym_key`, the
/// same one an erasure gives), or without a key the commitment `sha256:` +
/// hex(SHA-256(hold id + ":" + subject)). A value already in one of these
/// forms is kept as is.
pub fn released_subject(
    hold_id: &str,
    subject: &str,
    pseudonyms: Option<&Pseudonymizer>,
) -> String {
    if Pseudonymizer::is_pseudonym(subject) || is_subject_commitment(subject) {
        return subject.to_owned();
    }
    match pseudonyms {
        Some(p) => p.of_text(subject),
        None => {
            use sha2::{Digest, Sha256};
            format!(
                "{SUBJECT_COMMITMENT_PREFIX}{}",
                hex::encode(Sha256::digest(format!("{hold_id}:{subject}").as_bytes()))
            )
        }
    }
}

/// What a released hold's subject commitment starts with.
pub const SUBJECT_COMMITMENT_PREFIX: &str = "sha256:";

fn is_subject_commitment(value: &str) -> bool {
    value
        .strip_prefix(SUBJECT_COMMITMENT_PREFIX)
        .is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

/// Releases a hold (it stays in the table as the record that it stood).
/// The subject it named is replaced by [`released_subject`]: the record
/// says that a subject was held, and by whom, without keeping the id in
/// clear. Releasing a released hold returns it unchanged.
pub async fn release(
    client: &impl GenericClient,
    id: &str,
    released_by: &str,
    pseudonyms: Option<&Pseudonymizer>,
) -> Result<Option<Hold>, HoldError> {
    let Some(current) = client
        .query_opt("SELECT subject_id FROM legal_holds WHERE id = $1", &[&id])
        .await?
    else {
        return Ok(None);
    };
    let kept = current
        .get::<_, Option<String>>(0)
        .map(|subject| released_subject(id, &subject, pseudonyms));
    // Only the release changes the subject: a concurrent release computes
    // the same value, and a released hold keeps what it has.
    let row = client
        .query_opt(
            &format!(
                "UPDATE legal_holds SET released_at = COALESCE(released_at, now()),
                        released_by = COALESCE(released_by, $2),
                        subject_id = CASE WHEN released_at IS NULL THEN $3 ELSE subject_id END
                  WHERE id = $1 RETURNING {HOLD_COLUMNS}"
            ),
            &[&id, &released_by, &kept],
        )
        .await?;
    Ok(row.map(|r| hold_from_row(&r)))
}

/// Why a hold operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("{0}")]
    BadRequest(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The audit event of a hold placed or released.
pub fn hold_event(hold: &Hold, by: &str) -> crate::jobs::internal_event::InternalEvent {
    let (action, time, what) = match hold.released_at {
        None => ("audit.legal_hold.placed", hold.created_at, "placed"),
        Some(t) => ("audit.legal_hold.released", t, "released"),
    };
    let scope = format!(
        "organisation {}, subject {}, from {}, to {}",
        hold.organization_id.as_deref().unwrap_or("any"),
        if hold.subject_id.is_some() {
            "given"
        } else {
            "any"
        },
        hold.from.map_or("unbounded".into(), |t| t.to_rfc3339()),
        hold.to.map_or("unbounded".into(), |t| t.to_rfc3339()),
    );
    crate::jobs::internal_event::InternalEvent {
        event_id: format!("{action}-{}", hold.id),
        time,
        action: action.into(),
        principal_id: by.to_owned(),
        organization_id: hold.organization_id.clone(),
        target_type: "LegalHold".into(),
        target_id: hold.id.clone(),
        outcome: format!(
            "legal hold {} {what} ({scope}): {}; owner {}",
            hold.id, hold.reason, hold.owner
        ),
        details: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn hold() -> Hold {
        Hold {
            id: "h1".into(),
            organization_id: None,
            subject_id: None,
            from: None,
            to: None,
            reason: "case 7".into(),
            owner: "legal".into(),
            created_at: at("2026-01-01T00:00:00Z"),
            created_by: "cli:test".into(),
            released_at: None,
            released_by: None,
        }
    }

    fn row<'a>(org: &'a str, principal: &'a str, target: &'a str, t: &str) -> HeldRow<'a> {
        HeldRow {
            organization_id: Some(org),
            principal_id: Some(principal),
            target_resource_id: Some(target),
            event_time: at(t),
        }
    }

    #[test]
    fn a_hold_covers_rows_matching_every_set_condition() {
        let r = row("org-a", "u1", "p9", "2026-03-01T00:00:00Z");
        assert!(hold().covers(&r), "an unbounded hold covers everything");
        let mut h = hold();
        h.organization_id = Some("org-b".into());
        assert!(!h.covers(&r));
        h.organization_id = Some("org-a".into());
        assert!(h.covers(&r));
        h.subject_id = Some("p9".into());
        assert!(h.covers(&r), "the subject matches as target");
        h.subject_id = Some("u1".into());
        assert!(h.covers(&r), "the subject matches as principal");
        h.subject_id = Some("u2".into());
        assert!(!h.covers(&r));
        let mut h = hold();
        h.from = Some(at("2026-03-01T00:00:00Z"));
        assert!(h.covers(&r), "from is inclusive");
        h.to = Some(at("2026-03-01T00:00:00Z"));
        assert!(!h.covers(&r), "to is exclusive");
        let mut h = hold();
        h.released_at = Some(at("2026-02-01T00:00:00Z"));
        assert!(!h.covers(&r), "a released hold covers nothing");
    }

    #[test]
    fn covering_names_the_first_active_hold_over_any_row() {
        let mut released = hold();
        released.id = "h0".into();
        released.released_at = Some(at("2026-02-01T00:00:00Z"));
        let mut other = hold();
        other.id = "h2".into();
        other.subject_id = Some("u2".into());
        let holds = vec![released, other];
        let rows = [
            row("org-a", "u1", "p1", "2026-03-01T00:00:00Z"),
            row("org-a", "u3", "u2", "2026-03-02T00:00:00Z"),
        ];
        assert_eq!(covering(&holds, rows).map(|h| h.id.as_str()), Some("h2"));
        assert!(covering(&holds, [rows[0]]).is_none());
        assert!(covering(&[], rows).is_none());
        let e = holds[1].refusal();
        assert!(e.contains("h2") && e.contains("case 7"), "{e}");
    }

    #[test]
    fn a_released_hold_keeps_a_pseudonym_or_commitment_of_its_subject() {
        use crate::config::Secret;
        let p = Pseudonymizer::new(Secret::from("hold-test-key-0123456789".to_owned()));
        let with_key = released_subject("h1", "ana@clinic.test", Some(&p));
        assert_eq!(
            with_key,
            p.of_text("ana@clinic.test"),
            "the erasure's pseudonym"
        );
        let without = released_subject("h1", "ana@clinic.test", None);
        use sha2::{Digest, Sha256};
        assert_eq!(
            without,
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(b"h1:ana@clinic.test"))
            )
        );
        assert!(!without.contains("ana"));
        assert_ne!(
            released_subject("h2", "ana@clinic.test", None),
            without,
            "the hold id separates holds"
        );
        // Already replaced: kept.
        assert_eq!(released_subject("h1", &with_key, None), with_key);
        assert_eq!(released_subject("h1", &without, Some(&p)), without);
    }

    #[test]
    fn a_new_hold_needs_a_reason_an_owner_and_an_ordered_range() {
        let ok = NewHold {
            organization_id: Some("org-a".into()),
            subject_id: None,
            from: Some(at("2026-01-01T00:00:00Z")),
            to: Some(at("2026-02-01T00:00:00Z")),
            reason: "case".into(),
            owner: "legal".into(),
        };
        assert!(ok.check().is_ok());
        let mut bad = ok.clone();
        bad.reason = " ".into();
        assert!(bad.check().unwrap_err().contains("reason"));
        let mut bad = ok.clone();
        bad.owner = String::new();
        assert!(bad.check().unwrap_err().contains("owner"));
        let mut bad = ok.clone();
        bad.to = bad.from;
        assert!(bad.check().unwrap_err().contains("before"));
        let mut bad = ok;
        bad.subject_id = Some(String::new());
        assert!(bad.check().unwrap_err().contains("subjectId"));
    }
}
