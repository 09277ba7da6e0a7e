//! GDPR subject rights that keep the log verifiable: subject access
//! ([`access`], `gdpr.access`, Art. 15: an export job with a subject
//! filter whose artifact comes with every event's inclusion proof),
//! erasure (`gdpr.erase`; by the queue: [`erase_job`]), restriction of processing, and the legal holds
//! that erasure and retention must respect. The README's GDPR sections are
//! the user's description.

pub mod access;
pub mod cli;
pub mod erase;
pub mod erase_job;
pub mod hold;
pub mod pseudonym;
pub mod restriction;

/// Checks an id or text given by a requester (subject, organisation,
/// reason, owner): not blank, no NUL (PostgreSQL text cannot hold one), at
/// most 10,000 characters (the event's own limit). The error names `what`.
pub fn check_text(what: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.contains('\0') {
        return Err(format!("{what} must not contain a NUL character"));
    }
    if value.chars().count() > 10_000 {
        return Err(format!("{what} must be at most 10,000 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn requester_text_is_not_blank_has_no_nul_and_is_bounded() {
        assert!(super::check_text("subjectId", "u1").is_ok());
        for bad in ["", "  ", "a\0b"] {
            assert!(super::check_text("subjectId", bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(10_001);
        assert!(super::check_text("reason", &long)
            .unwrap_err()
            .contains("reason"));
    }
}
