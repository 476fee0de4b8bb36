-- resign_leadership.lua: compare-and-delete of the beat leader lease (a clean stop).
--
-- KEYS[1] = p:{beat}:leader
-- ARGV[1] = node
-- Returns 1 if `node` held the lease (now free), 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
