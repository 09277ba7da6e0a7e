//! A BullMQ job's raw `data` bytes, read with one script call beside the
//! crate's own fetch (bullmq-official hands the data over parsed, after a
//! lossy UTF-8 conversion and a duplicate-collapsing parse).

use redis::Value as RedisValue;

/// Reads a job's raw data, or dead-letters it inside Redis when it is too
/// large (see [`QueueHandler::job_bytes`]). Hand-written because the crate
/// offers no raw read; it reads one field of the job's hash and writes only
/// our DLQ, never BullMQ's state.
pub const JOB_DATA_LUA: &str = include_str!("job_data.lua");

/// A job's data as [`JOB_DATA_LUA`] found it.
#[derive(Debug, PartialEq, Eq)]
pub enum JobData {
    /// The bytes the producer stored (`null` for a job whose hash has no
    /// data, as BullMQ itself reads it).
    Bytes(Vec<u8>),
    /// Over `validation.max_event_bytes`: already dead-lettered.
    DeadLettered { bytes: u64 },
}

/// Parses the script's reply: `{-1}`, `{size}` or `{size, data}`.
pub fn parse_job_data(v: RedisValue) -> Option<JobData> {
    let RedisValue::Array(parts) = v else {
        return None;
    };
    let mut parts = parts.into_iter();
    let size = match parts.next()? {
        RedisValue::Int(n) => n,
        _ => return None,
    };
    match (size, parts.next()) {
        (-1, None) => Some(JobData::Bytes(b"null".to_vec())),
        (n, None) if n >= 0 => Some(JobData::DeadLettered {
            bytes: u64::try_from(n).ok()?,
        }),
        (_, Some(RedisValue::BulkString(data))) => Some(JobData::Bytes(data)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_data_replies_parse_to_bytes_a_dead_letter_or_a_missing_job() {
        use redis::Value as R;
        assert_eq!(
            parse_job_data(R::Array(vec![R::Int(3), R::BulkString(b"{\xff}".to_vec())])),
            Some(JobData::Bytes(b"{\xff}".to_vec()))
        );
        assert_eq!(
            parse_job_data(R::Array(vec![R::Int(10_485_760)])),
            Some(JobData::DeadLettered { bytes: 10_485_760 })
        );
        assert_eq!(
            parse_job_data(R::Array(vec![R::Int(-1)])),
            Some(JobData::Bytes(b"null".to_vec()))
        );
        assert_eq!(parse_job_data(R::Nil), None);
    }
}
