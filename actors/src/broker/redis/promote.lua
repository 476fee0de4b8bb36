-- promote.lua: moves one batch of due delayed entries of one queue to its stream
-- (RedisBroker::promote_due), atomically: an entry is in exactly one of the two.
--
-- KEYS[1] = p:{q}:delayed, KEYS[2] = p:{q}:stream
-- ARGV[1] = now (epoch ms), ARGV[2] = batch size
-- Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = 1, #due do
  redis.call('XADD', KEYS[2], '*', 'e', due[i])
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return #due
