-- requeue.lua: moves dead letters back to the stream (RedisBroker::requeue_dead). The caller
-- read them and rewrote each envelope with attempt = 0; a letter moves only if it is still in
-- the dead-letter stream (XDEL says so), so two nodes requeuing at once never duplicate one.
-- A moved letter's record starts afresh — `queued`, no attempts, no start marker, no error,
-- no TTL: its entry exists again, so its id is taken until its next outcome — and a
-- revocation of it is dropped (requeued on purpose, it is meant to run; the revocation
-- counter moves, so every node forgets it at its next read). Every key is type-checked before
-- the first write, so a letter is never deleted without being re-added.
--
-- On a Redis Cluster the revocations are in another slot: the caller drops them before this
-- call (ARGV[2] = '0') and KEYS[3], KEYS[4] are not given.
--
-- KEYS[1] = p:{q}:dead, KEYS[2] = p:{q}:stream, KEYS[3] = p:revoked, KEYS[4] = p:revoked:seq
-- (when ARGV[2] = '1'), then the records' keys.
-- ARGV[1] = now (RFC 3339), ARGV[2] = '1' when the revocations are dropped here, then per
-- letter 7 fields: dead entry id, new envelope JSON, record key, task id, task, queue,
-- enqueued_at.
-- Returns how many moved.
local FIELDS, FIRST = 7, 3
local revocations = ARGV[2] == '1'
local function check(key, need)
  local held = redis.call('TYPE', key).ok
  if held ~= 'none' and held ~= need then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held .. ', not a ' .. need)
  end
end
local problem = check(KEYS[1], 'stream') or check(KEYS[2], 'stream')
  or (revocations and (check(KEYS[3], 'zset') or check(KEYS[4], 'string')))
for i = FIRST, #ARGV, FIELDS do
  problem = problem or check(ARGV[i + 2], 'hash')
end
if problem then return problem end

local now, moved, unrevoked = ARGV[1], 0, 0
for i = FIRST, #ARGV, FIELDS do
  local entry, json, record, id, task, queue, enqueued_at = unpack(ARGV, i, i + FIELDS - 1)
  if redis.call('XDEL', KEYS[1], entry) == 1 then
    redis.call('XADD', KEYS[2], '*', 'e', json)
    redis.call('HSET', record, 'id', id, 'task', task, 'queue', queue, 'state', 'queued',
      'due', '', 'result', '', 'error', '', 'attempts', 0, 'enqueued_at', enqueued_at,
      'updated_at', now)
    redis.call('HDEL', record, 'started', 'lost')
    redis.call('PERSIST', record)
    if revocations then
      unrevoked = unrevoked + redis.call('ZREM', KEYS[3], 'r:' .. id, 't:' .. id)
    end
    moved = moved + 1
  end
end
if unrevoked > 0 then
  redis.call('INCR', KEYS[4])
end
return moved
