-- The raw `data` of one BullMQ job, for audit-worker (src/source/bullmq/job_data.rs,
-- JOB_DATA_LUA): the bytes exactly as the producer stored them, or, when
-- they are larger than validation.max_event_bytes, a dead letter written
-- here with those bytes, so an oversized job's data is never read into the
-- worker a second time (bullmq-official has already fetched it once).
--
-- It reads one field of the job's hash (key from bullmq-official's
-- QueueKeys) and writes only our own DLQ stream: no BullMQ state changes
-- here; failing the job stays with bullmq-official.
--
-- KEYS[1] the job's hash, KEYS[2] the dead-letter stream
-- ARGV[1] max bytes, ARGV[2] job name, ARGV[3] source, ARGV[4] failed_at,
-- ARGV[5] attempts
--
-- Returns { -1 } when the job's hash has no data (the job was removed),
-- { size } when it was too large and is dead-lettered, { size, data }.
local data = redis.call('HGET', KEYS[1], 'data')
if not data then
  return { -1 }
end
local size = #data
if size > tonumber(ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', 'data', data, 'name', ARGV[2],
    'reason', 'too_large',
    'error', 'event is ' .. size .. ' bytes, the limit is ' .. ARGV[1] ..
      ' (validation.max_event_bytes); dead-lettered in Redis without being read again',
    'source', ARGV[3], 'failed_at', ARGV[4], 'attempts', ARGV[5])
  return { size }
end
return { size, data }
