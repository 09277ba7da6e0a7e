//! Why a message can never be stored: stable reason codes and the
//! rejection that carries one with a human sentence. Validation, the sink
//! and the job handlers produce them; dead letters and metrics carry them.

/// Stable reason codes written to the `reason` field of a dead letter.
///
/// These strings are a contract with operators (dashboards, `dlq replay
/// --reason`): add new ones, never rename old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not valid UTF-8, not JSON, or not a JSON object.
    InvalidJson,
    /// A required field is missing, or a field has the wrong type or value.
    InvalidEvent,
    /// A string is longer than `validation.max_string_chars`.
    StringTooLong,
    /// A custom field nests deeper than `validation.max_custom_depth`.
    NestingTooDeep,
    /// The raw event is larger than `validation.max_event_bytes`.
    TooLarge,
    /// A string contains U+0000, which PostgreSQL cannot store in text/jsonb.
    NulCharacter,
    /// The timestamp lies outside the accepted window (too old, or in the future).
    TimestampOutOfRange,
    /// `hashAlgorithm` or `algorithm` names something other than SHA-256 / HMAC-SHA256.
    UnsupportedAlgorithm,
    /// The event carries no `hash` and `validation.require_hash` is on.
    MissingHash,
    /// The `hash` differs from canonical hash v1 of the event.
    HashMismatch,
    /// The event carries no `signature` and `validation.require_signature` is on.
    MissingSignature,
    /// No configured HMAC key produced the `signature`.
    SignatureMismatch,
    /// PostgreSQL refused the row for a reason no retry can fix.
    DatabaseRejected,
    /// The entry was delivered more than `max_deliveries` times without success.
    MaxDeliveries,
    /// Another event with a different hash is already stored under the
    /// same idempotency key and event time.
    IdempotencyConflict,
    /// The job name names a kind this worker does not handle.
    UnknownKind,
    /// A JSON object has the same key twice. Parsers disagree on which
    /// value wins (first or last), so the event a producer hashed and the
    /// row we would store could differ: refused rather than guessed.
    DuplicateKey,
    /// An `export.audit` request is malformed (unknown format or filter
    /// key, `from` after `to`, ...).
    InvalidExportRequest,
    /// A `report.compliance` request is malformed (unknown report kind or
    /// format, `from` after `to`, an organisation outside the allowed ones).
    InvalidReportRequest,
    /// A `gdpr.access` request is malformed (no subject, unknown format,
    /// an organisation outside the allowed ones, ...).
    InvalidAccessRequest,
    /// A `gdpr.erase` request is malformed (no subject or requester, a
    /// pseudonym as subject, an organisation outside the allowed ones, ...).
    InvalidEraseRequest,
    /// A `gdpr.erase` request refused because an active legal hold covers
    /// events of the subject; the error names the hold.
    LegalHold,
    /// A `gdpr.erase` request that cannot run on the stored data (a stored
    /// salt or erasure record that does not parse, a data error the
    /// database raises about the rows): retrying cannot help until an
    /// operator looks.
    ErasureFailed,
}

impl RejectReason {
    /// The stable code written to dead letters and metric labels.
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidEvent => "invalid_event",
            Self::StringTooLong => "string_too_long",
            Self::NestingTooDeep => "nesting_too_deep",
            Self::TooLarge => "too_large",
            Self::NulCharacter => "nul_character",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::MissingHash => "missing_hash",
            Self::HashMismatch => "hash_mismatch",
            Self::MissingSignature => "missing_signature",
            Self::SignatureMismatch => "signature_mismatch",
            Self::DatabaseRejected => "database_rejected",
            Self::MaxDeliveries => "max_deliveries",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::UnknownKind => "unknown_kind",
            Self::DuplicateKey => "duplicate_key",
            Self::InvalidExportRequest => "invalid_export_request",
            Self::InvalidReportRequest => "invalid_report_request",
            Self::InvalidAccessRequest => "invalid_access_request",
            Self::InvalidEraseRequest => "invalid_erase_request",
            Self::LegalHold => "legal_hold",
            Self::ErasureFailed => "erasure_failed",
        }
    }

    /// Every reason, for documentation and for pre-registering metric labels.
    pub const ALL: [RejectReason; 23] = [
        Self::InvalidJson,
        Self::InvalidEvent,
        Self::StringTooLong,
        Self::NestingTooDeep,
        Self::TooLarge,
        Self::NulCharacter,
        Self::TimestampOutOfRange,
        Self::UnsupportedAlgorithm,
        Self::MissingHash,
        Self::HashMismatch,
        Self::MissingSignature,
        Self::SignatureMismatch,
        Self::DatabaseRejected,
        Self::MaxDeliveries,
        Self::UnknownKind,
        Self::DuplicateKey,
        Self::InvalidExportRequest,
        Self::InvalidReportRequest,
        Self::InvalidAccessRequest,
        Self::IdempotencyConflict,
        Self::InvalidEraseRequest,
        Self::LegalHold,
        Self::ErasureFailed,
    ];
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// Why an event can never be stored: a stable code and a human sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    /// Builds a rejection with its explanatory message.
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The rejection of an event whose idempotency key and time are already
    /// stored with another canonical hash: names both hashes, so an operator
    /// can tell which producer reused the `eventId`.
    pub fn idempotency_conflict(
        key: &str,
        event_time: chrono::DateTime<chrono::Utc>,
        stored_hash: &str,
        hash: &str,
    ) -> Self {
        let time = event_time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        Self::new(
            RejectReason::IdempotencyConflict,
            format!(
                "event {key} at {time} conflicts with the stored event: stored hash \
                 {stored_hash}, this event's hash {hash} (each event needs its own eventId)"
            ),
        )
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.message)
    }
}
