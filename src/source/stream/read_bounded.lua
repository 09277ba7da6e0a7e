-- Bounded stream read for audit-worker (src/source/stream/bounded_read.rs).
--
-- XREADGROUP without BLOCK, exactly as the worker would issue it, except
-- that an entry too large to be a valid event never leaves Redis: it is
-- dead-lettered here, with its original bytes, acknowledged and (when
-- delete_acked) deleted, all in this one atomic script, just as the
-- worker's own MULTI/EXEC does for other rejected entries. So a flood of
-- huge entries cannot grow the worker's memory: a reply holds at most
-- COUNT entries of at most max_data + max_other bytes each.
--
-- KEYS[1] the stream, KEYS[2] the dead-letter stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] COUNT, ARGV[4] start id ('>' or
-- a cursor into our own pending entries), ARGV[5] max bytes of the data
-- field (validation.max_event_bytes), ARGV[6] max bytes of all other
-- fields and names together, ARGV[7] failed_at (RFC 3339, from the
-- worker's clock), ARGV[8] '1' to XDEL acknowledged entries, ARGV[9] bytes
-- of oversized entries after which this call stops (bounds how long one
-- call holds Redis: copying a 10 MB entry into the DLQ takes tens of ms).
--
-- Entries are read in chunks that start at one and double while nothing is
-- oversized (a few XREADGROUP calls for a full COUNT of normal events), and
-- fall back to one after an oversized entry, so a call never pulls many
-- huge entries into the script at once.
--
-- Returns { kept entries (as XREADGROUP returns them),
--           { id, data bytes, other bytes, ... } of each dead-lettered one }.
-- The dead letter has the fields the worker writes (src/dlq/letter.rs); a test
-- reads it back with the worker's own DLQ parser.
local want = tonumber(ARGV[3])
local max_data = tonumber(ARGV[5])
local max_other = tonumber(ARGV[6])
local budget = tonumber(ARGV[9])
local start = ARGV[4]
local kept, dropped = {}, {}
local spent = 0
local chunk = 1

-- Dead-letters one oversized entry with its original bytes, acknowledges
-- and (optionally) deletes it.
local function dead_letter(id, data, name, data_len, other)
  local err
  if data_len > max_data then
    err = 'event is ' .. data_len .. ' bytes, the limit is ' .. max_data ..
      ' (validation.max_event_bytes); dead-lettered in Redis without being read'
  else
    err = 'entry fields other than data take ' .. other .. ' bytes, the limit is ' ..
      max_other .. '; dead-lettered in Redis without being read'
  end
  local attempts = 1
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if pending[1] then
    attempts = pending[1][4]
  end
  if name == nil or name == '' then
    name = 'audit.event'
  end
  redis.call('XADD', KEYS[2], '*', 'data', data or '', 'name', name,
    'reason', 'too_large', 'error', err, 'source', 'stream:' .. KEYS[1] .. ':' .. id,
    'failed_at', ARGV[7], 'attempts', attempts)
  redis.call('XACK', KEYS[1], ARGV[1], id)
  if ARGV[8] == '1' then
    redis.call('XDEL', KEYS[1], id)
  end
end

while #kept < want and spent < budget do
  local n = math.min(chunk, want - #kept)
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', n,
    'STREAMS', KEYS[1], start)
  if not reply or not reply[1] then
    break
  end
  local entries = reply[1][2]
  if #entries == 0 then
    break
  end
  local oversized = false
  for _, entry in ipairs(entries) do
    local id, fields = entry[1], entry[2]
    local data, name, other = nil, nil, 0
    if fields then
      for i = 1, #fields, 2 do
        local k, v = fields[i], fields[i + 1]
        if k == 'data' and data == nil then
          data = v
        else
          if k == 'name' and name == nil then
            name = v
          end
          other = other + #k + #v
        end
      end
    end
    local data_len = data and #data or 0
    if fields and (data_len > max_data or other > max_other) then
      dead_letter(id, data, name, data_len, other)
      spent = spent + data_len + other
      oversized = true
      table.insert(dropped, id)
      table.insert(dropped, data_len)
      table.insert(dropped, other)
    else
      table.insert(kept, entry)
    end
    if start ~= '>' then
      start = id
    end
  end
  if #entries < n then
    break
  end
  if oversized then
    chunk = 1
  else
    chunk = chunk * 2
  end
end
return { kept, dropped }
