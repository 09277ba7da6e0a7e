-- The raw `data` of a group of BullMQ jobs, for audit-worker
-- (src/source/bullmq/job_data.rs, JOB_DATA_LUA): the bytes exactly as each
-- producer stored them, or, when they are larger than
-- validation.max_event_bytes, a dead letter written here with those bytes,
-- so an oversized job's data is never read into the worker a second time
-- (bullmq-official has already fetched it once). One call serves every job
-- whose read was waiting when it was sent.
--
-- It reads one field of each job's hash (keys from bullmq-official's
-- QueueKeys) and writes only our own DLQ stream: no BullMQ state changes
-- here; failing a job stays with bullmq-official.
--
-- KEYS[1] the dead-letter stream, KEYS[2..n+1] the jobs' hashes
-- ARGV[1] max bytes, ARGV[2] failed_at, then for job i (1-based)
-- ARGV[3i] job name, ARGV[3i+1] source, ARGV[3i+2] attempts
--
-- Returns one reply per job, in KEYS order: { -1 } when the job's hash has
-- no data (the job was removed), { size } when it was too large and is
-- dead-lettered, { size, data } otherwise.
local max = tonumber(ARGV[1])
local replies = {}
for i = 2, #KEYS do
  local data = redis.call('HGET', KEYS[i], 'data')
  local j = 3 * (i - 1)
  if not data then
    replies[i - 1] = { -1 }
  elseif #data > max then
    redis.call('XADD', KEYS[1], '*', 'data', data, 'name', ARGV[j],
      'reason', 'too_large',
      'error', 'event is ' .. #data .. ' bytes, the limit is ' .. ARGV[1] ..
        ' (validation.max_event_bytes); dead-lettered in Redis without being read again',
      'source', ARGV[j + 1], 'failed_at', ARGV[2], 'attempts', ARGV[j + 2])
    replies[i - 1] = { #data }
  else
    replies[i - 1] = { #data, data }
  end
end
return replies
