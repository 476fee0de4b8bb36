-- revoke.lua: revokes one task (RedisBroker::revoke), in one step: looks at its record, keeps
-- the revocation, tells every node, and — for a task that has not started — makes sure it never
-- runs.
--
-- - Ended (its record says succeeded, or dead for another reason than a revocation): nothing
--   is written; answers {'ended', state}. Revoked already: {'revoked'}.
-- - Otherwise the revocation is kept: ZADD p:revoked <until ms> 'r:<id>' (or 't:<id>' when a
--   running attempt is to be terminated), expired members dropped, the counter
--   p:revoked:seq incremented (a node catches up with the set when the counter moved, in the
--   round trip of its next read), and PUBLISH on the revocations channel (the node running the
--   task acts at once).
-- - Running (its start marker `started` is at least its attempts with an outcome, and not
--   `lost`): {'running'};
--   the node running it decides (terminate, or let the attempt finish).
-- - No record (unknown, expired, or an entry another producer wrote that no consumer took
--   yet): {'unknown'}; the kept revocation stops it if it is met within the TTL.
-- - Not started (queued, scheduled, retrying): its record says dead with the error `revoked`
--   (no TTL: its entry still exists; the consumer that meets the entry dead-letters it, which
--   sets the TTL), and a delayed entry (found by its record's `due`, the delayed set's score)
--   is moved to the stream at once, so a consumer meets it now rather than at its time:
--   {'pending', state}.
--
-- On a Redis Cluster the revocations are in another slot than the record: the caller keeps the
-- revocation itself (after reading that the task has not ended, before this call) and this
-- call (ARGV[8] = '0', KEYS[2], KEYS[3] not given) does the record's part only.
--
-- KEYS[1] = p:result:<id> (a cluster: p:{q}:result:<id>), KEYS[2] = p:revoked,
-- KEYS[3] = p:revoked:seq
-- ARGV[1] = id, ARGV[2] = terminate ('1'/'0'), ARGV[3] = now (epoch ms), ARGV[4] = until
-- (epoch ms), ARGV[5] = the revocations channel, ARGV[6] = key prefix, ARGV[7] = now (RFC 3339),
-- ARGV[8] = '1' when the revocation is kept here, ARGV[9] = the streams its delayed entry may
-- be in, comma-separated (a partitioned queue's: `q,q:1,q:2`; on a cluster the one its record
-- was found in), else '' (then the record's `queue`).
-- The queue's delayed set and stream are named from the record's queue (`p:{q}:delayed`,
-- `p:{q}:stream`), as purge.lua and recover.lua name the records they touch.
local record, revoked, seq = KEYS[1], KEYS[2], KEYS[3]
local id, terminate, now_ms, until_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local channel, prefix, now = ARGV[5], ARGV[6], ARGV[7]
local keep = ARGV[8] == '1'

local function check(key, need)
  local held = redis.call('TYPE', key).ok
  if held ~= 'none' and held ~= need then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held .. ', not a ' .. need
      .. ' (nothing was revoked)')
  end
end
local problem = check(record, 'hash')
  or (keep and (check(revoked, 'zset') or check(seq, 'string')))
if problem then return problem end

local exists = redis.call('EXISTS', record) == 1
local state = exists and redis.call('HGET', record, 'state') or false
if state == 'succeeded' or state == 'dead' then
  if state == 'dead' and redis.call('HGET', record, 'error') == 'revoked' then
    return { 'revoked' }
  end
  return { 'ended', state }
end

-- Where its delayed entry may be (each stream's delayed set and stream), checked before the
-- first write.
local places, due = {}, nil
local started = exists and tonumber(redis.call('HGET', record, 'started') or '') or nil
local ended = exists and (tonumber(redis.call('HGET', record, 'attempts') or '') or 0) or 0
local lost = exists and redis.call('HGET', record, 'lost') == '1'
local running = started ~= nil and started >= ended and not lost
if exists and not running and (state == 'scheduled' or state == 'retrying') then
  due = tonumber(redis.call('HGET', record, 'due') or '')
  local queues = ARGV[9] ~= '' and ARGV[9] or redis.call('HGET', record, 'queue')
  if due and queues then
    for queue in string.gmatch(queues, '[^,]+') do
      local delayed = prefix .. ':{' .. queue .. '}:delayed'
      local stream = prefix .. ':{' .. queue .. '}:stream'
      problem = check(delayed, 'zset') or check(stream, 'stream')
      if problem then return problem end
      table.insert(places, { delayed, stream })
    end
  end
end

if keep then
  redis.call('ZADD', revoked, until_ms, (terminate == '1' and 't:' or 'r:') .. id)
  redis.call('ZREMRANGEBYSCORE', revoked, '-inf', now_ms)
  redis.call('INCR', seq)
  redis.call('PUBLISH', channel,
    cjson.encode({ id = id, terminate = terminate == '1', ['until'] = until_ms }))
end

if not exists then
  return { 'unknown' }
end
if running then
  return { 'running' }
end
for _, place in ipairs(places) do
  local delayed, stream, moved = place[1], place[2], false
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', delayed, due, due)) do
    local ok, envelope = pcall(cjson.decode, member)
    if ok and type(envelope) == 'table' and envelope.id == id then
      redis.call('ZREM', delayed, member)
      redis.call('XADD', stream, '*', 'e', member)
      moved = true
      break
    end
  end
  if moved then break end
end
redis.call('HSET', record, 'state', 'dead', 'error', 'revoked', 'updated_at', now)
return { 'pending', state or 'queued' }
