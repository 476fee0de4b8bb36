-- requeue.lua: moves dead letters back to the stream (RedisBroker::requeue_dead). The caller
-- read them and rewrote each envelope with attempt = 0; a letter moves only if it is still in
-- the dead-letter stream (XDEL says so), so two nodes requeuing at once never duplicate one.
-- A moved letter's id guard is set again, without TTL: its entry exists again, so its id is
-- taken until its next outcome. Both streams are type-checked before the first write, so a
-- letter is never deleted without being re-added.
--
-- KEYS[1] = p:{q}:dead, KEYS[2] = p:{q}:stream
-- ARGV[1] = the queue (the guards' value), then per letter: dead entry id, new envelope JSON,
-- id guard key.
-- Returns how many moved.
for _, key in ipairs(KEYS) do
  local held = redis.call('TYPE', key).ok
  if held ~= 'none' and held ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held .. ', not a stream')
  end
end
local moved = 0
for i = 2, #ARGV, 3 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'e', ARGV[i + 1])
    redis.call('SET', ARGV[i + 2], ARGV[1])
    moved = moved + 1
  end
end
return moved
