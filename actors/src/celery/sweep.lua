-- sweep.lua: the holding lists of other nodes' bridges of one kombu queue that hold messages
-- (celery::bridge), for this bridge's next take to move on; forgets a node whose list is empty
-- and whose presence record is gone (it is dead and cannot move a message there any more).
--
-- KEYS[1] = the queue's holders set (node names), ARGV[1] = runtime key prefix (`rt`),
-- ARGV[2] = the kombu queue, ARGV[3] = this node's name. Returns the non-empty lists' keys.
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[3] then
    local held = ARGV[1] .. ':celery:held:' .. node .. ':' .. ARGV[2]
    if redis.call('LLEN', held) > 0 then
      table.insert(out, held)
    elseif redis.call('EXISTS', ARGV[1] .. ':{nodes}:node:' .. node) == 0 then
      redis.call('SREM', KEYS[1], node)
    end
  end
end
return out
