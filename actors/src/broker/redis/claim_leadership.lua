-- claim_leadership.lua: the beat leader lease (RedisBroker::claim_leadership), in one step:
-- the holder renews it (compare-and-PEXPIRE), anyone takes it when nobody holds it
-- (SET NX PX), and everyone learns who holds it.
--
-- KEYS[1] = p:{beat}:leader
-- ARGV[1] = node, ARGV[2] = lease (ms)
-- Returns the holder after the call.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return holder
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return ARGV[1]
end
return holder
