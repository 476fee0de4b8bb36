-- hand_back.lua: a node leaving cleanly gives back entries it reserved but did not start
-- (RedisBroker::hand_back). Each entry still pending for that consumer is acked, deleted and
-- re-added at the stream tail with the same fields (so the same envelope and delivery count):
-- it is ready at once for any consumer, nobody waits for a lease. Entries the consumer no
-- longer holds (recovered elsewhere) are left alone. Atomic: the entry is never in two places.
--
-- KEYS[1] = p:{q}:stream
-- ARGV[1] = group, ARGV[2] = consumer, ARGV[3..] = entry ids
-- Returns the number of entries handed back.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local moved = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local pending = redis.call('XPENDING', stream, group, id, id, 1, consumer)
  if #pending > 0 then
    local found = redis.call('XRANGE', stream, id, id)
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
    if #found > 0 then
      redis.call('XADD', stream, '*', unpack(found[1][2]))
      moved = moved + 1
    end
  end
end
return moved
