//! A BullMQ job's raw `data` bytes, read with a script call beside the
//! crate's own fetch (bullmq-official hands the data over parsed, after a
//! lossy UTF-8 conversion and a duplicate-collapsing parse): the script and
//! its replies, free of I/O; [`super::data_reader`] sends it.

use redis::Value as RedisValue;

/// Reads the raw data of a group of jobs, or dead-letters a job's data
/// inside Redis when it is too large (see
/// [`super::handler::QueueHandler`]). Hand-written because the crate offers
/// no raw read; it reads one field of each job's hash and writes only our
/// DLQ, never BullMQ's state.
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

/// Parses the script's reply for a group of `jobs` jobs: one entry per
/// job, in the order they were sent; `None` when the reply has another
/// shape (a different script answered, say).
pub fn parse_job_data_group(v: RedisValue, jobs: usize) -> Option<Vec<JobData>> {
    let RedisValue::Array(replies) = v else {
        return None;
    };
    if replies.len() != jobs {
        return None;
    }
    replies.into_iter().map(parse_job_data).collect()
}

/// Parses one job's reply: `{-1}`, `{size}` or `{size, data}`.
fn parse_job_data(v: RedisValue) -> Option<JobData> {
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

    #[test]
    fn a_group_reply_keeps_the_order_of_its_jobs_and_refuses_a_wrong_count() {
        use redis::Value as R;
        let reply = || {
            R::Array(vec![
                R::Array(vec![R::Int(2), R::BulkString(b"{}".to_vec())]),
                R::Array(vec![R::Int(-1)]),
                R::Array(vec![R::Int(99)]),
            ])
        };
        assert_eq!(
            parse_job_data_group(reply(), 3),
            Some(vec![
                JobData::Bytes(b"{}".to_vec()),
                JobData::Bytes(b"null".to_vec()),
                JobData::DeadLettered { bytes: 99 },
            ])
        );
        assert_eq!(parse_job_data_group(reply(), 2), None);
        assert_eq!(parse_job_data_group(R::Array(vec![R::Nil]), 1), None);
        assert_eq!(parse_job_data_group(R::Int(1), 1), None);
    }
}
