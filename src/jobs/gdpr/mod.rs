//! GDPR data subject rights over the audit trail (README, "GDPR").
//!
//! Each right is a job kind on the shared processor, built on the existing
//! job machinery: [`access`] (`gdpr.access`, Art. 15) is an export job with
//! a subject filter whose artifact comes with every event's inclusion proof.

pub mod access;
