//! One dead letter as the worker writes it.

use chrono::{SecondsFormat, Utc};

use super::RejectReason;

/// One dead letter, as written to the `audit:dlq` stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original `data` bytes, untouched (even when not UTF-8).
    pub data: Vec<u8>,
    /// The job kind the message named (`audit.event` when it named none).
    pub name: String,
    pub reason: RejectReason,
    /// A human explanation.
    pub error: String,
    /// `stream:<key>:<entry id>` or `bullmq:<queue>:<job id>`.
    pub source: String,
    /// Deliveries of the message so far.
    pub attempts: u64,
}

impl DeadLetter {
    /// Appends the XADD for this dead letter to a pipeline, so it can be
    /// made atomic with the acknowledgement of the original message.
    pub fn add_to(&self, pipe: &mut redis::Pipeline, dlq_key: &str) {
        let failed_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        pipe.cmd("XADD")
            .arg(dlq_key)
            .arg("*")
            .arg("data")
            .arg(&self.data[..])
            .arg("name")
            .arg(&self.name)
            .arg("reason")
            .arg(self.reason.code())
            .arg("error")
            .arg(&self.error)
            .arg("source")
            .arg(&self.source)
            .arg("failed_at")
            .arg(failed_at)
            .arg("attempts")
            .arg(self.attempts)
            .ignore();
    }
}
