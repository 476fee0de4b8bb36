-- sweep.lua: the orphaned holding lists of one kombu queue (celery::bridge): lists whose
-- registration has run out (their node stopped refreshing it: it is dead, or cut off from
-- Redis for longer than a wait plus bridge::HOLD_GRACE) and that hold messages, for this
-- bridge's next fetch to move into its own holding list. Run-out registrations of empty lists
-- are forgotten (an empty list does not exist in Redis).
--
-- A mover registers its list (take.lua, and the blocking waits in the same round trip) before
-- it can move anything in, valid past the longest that move can take: a registration in the
-- future means its node may still move messages in, so the list is left alone — that closes
-- the race of a node registering while another sweeps. Even an adopted list of a live node
-- loses nothing: its mover checks each message it places against the list (take.lua).
--
-- KEYS[1] = the queue's holding registry (sorted set: list key → valid until, epoch ms),
-- KEYS[2] = the set of node names an earlier version registered its lists in (read only; a
-- node of it counts as dead once its presence record is gone, as that version had it).
-- ARGV[1] = runtime key prefix (`rt`), ARGV[2] = the kombu queue.
-- Returns the orphaned lists' keys.
local registry, legacy = KEYS[1], KEYS[2]
local prefix, queue = ARGV[1], ARGV[2]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local out = {}
if redis.call('TYPE', registry).ok == 'zset' then
  for _, held in ipairs(redis.call('ZRANGE', registry, '-inf', now, 'BYSCORE')) do
    local has = redis.call('TYPE', held).ok
    if has == 'list' then
      table.insert(out, held)
    elseif has == 'none' then
      redis.call('ZREM', registry, held)
    end
  end
end
if redis.call('TYPE', legacy).ok == 'set' then
  for _, node in ipairs(redis.call('SMEMBERS', legacy)) do
    if redis.call('EXISTS', prefix .. ':{nodes}:node:' .. node) == 0 then
      local held = prefix .. ':celery:held:' .. node .. ':' .. queue
      local has = redis.call('TYPE', held).ok
      if has == 'list' then
        table.insert(out, held)
      elseif has == 'none' then
        redis.call('SREM', legacy, node)
      end
    end
  end
end
return out
