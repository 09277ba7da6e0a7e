//! GDPR subject rights that keep the log verifiable: erasure
//! (`gdpr.erase`), restriction of processing, and the legal holds that
//! erasure must respect. README "GDPR: erasure, restriction and legal
//! holds" is the user's description.

pub mod cli;
pub mod erase;
pub mod hold;
pub mod pseudonym;
pub mod restriction;
