-- take.lua: one call of a Celery bridge's mover (celery::bridge): places the messages its
-- last call fetched, then fetches the next ones — atomically, so a message is always in
-- exactly one place whenever the calling process dies: a kombu list, a holding list, or (moved
-- whole) one runtime stream or the dead letters.
--
-- The node decodes the fetched messages (celery::bridge::placement, in Rust: Redis' Lua has no
-- fast JSON for ~1 KB messages) and sends each back with where it goes. Placing pops the
-- holding list's oldest message and checks it is, byte for byte, the one the node decoded: if
-- not (another node adopted the list meanwhile, a wait moved one in between) it is pushed back
-- where it was and placing stops — the node reads the list again with the fetch. So what a
-- message becomes is always decided from its own bytes, and a message popped is placed once.
--
-- KEYS[1] = this mover's holding list, KEYS[2] = the queue's holding registry (sorted set),
-- KEYS[3..] = the lists a fetch moves from, in order: orphaned holding lists of dead nodes
-- (sweep.lua), then the kombu lists by priority (`q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`).
-- ARGV[1] = runtime key prefix (`rt`), ARGV[2] = runtime queue whose dead letters take
-- malformed messages, ARGV[3] = now (RFC 3339), ARGV[4] = events stream MAXLEN ('0': no
-- events), ARGV[5] = how long (ms) the holding list's registration is valid, ARGV[6] = how
-- many messages to fetch (0: none), ARGV[7] = how many to place, then per message, oldest
-- first:
--   'm', raw, id, runtime task, runtime queue, envelope JSON   (move into the runtime stream)
--   'd', raw, reason, event detail JSON                        (dead-letter)
--
-- A moved message's task id follows the runtime's rule for chosen ids (checked by the node,
-- broker::check_id; a refused one is dead-lettered): an id with a record (`p:result:<id>`: its
-- task is queued, running, retried, or ended less than result_ttl ago) is a duplicate (a
-- producer that published twice, a message restored after a crash) and is dropped, not run
-- again. Otherwise its record is written (`queued`, no TTL) with its XADD, so a message is
-- never taken for a duplicate of itself.
--
-- Every key it writes or moves from is type-checked before the first write: a runtime stream,
-- the dead letters, the events stream, a list or the registry holding another type fails the
-- call with nothing done.
--
-- Producers LPUSH (and moves push LEFT), so the oldest message is at the right end: RPOP and
-- `LMOVE … RIGHT LEFT` keep FIFO.
--
-- Returns {placed, codes, stopped, fetched}: how many messages were placed, one letter per
-- placed message (`m` moved, `d` dead-lettered, `u` dropped as a duplicate), 1 when placing
-- stopped at a message that was not the expected one, and the fetched messages: up to ARGV[6]
-- of the holding list's oldest, newest first (the list's order), after topping it up from
-- KEYS[3..].
local held, registry = KEYS[1], KEYS[2]
local prefix, dlq, at, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, fetch, count = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
-- An event is one field: its kind, then the rest as JSON (broker::redis::events::xadd_event).
local events, json_at = prefix .. ':events', cjson.encode(at)
local dead = prefix .. ':{' .. dlq .. '}:dead'

local function stream_of(queue)
  return prefix .. ':{' .. queue .. '}:stream'
end

local items, i = {}, 8
for n = 1, count do
  if ARGV[i] == 'm' then
    items[n] = { 'm', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5] }
    i = i + 6
  else
    items[n] = { 'd', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3] }
    i = i + 4
  end
end

local wanted = { [held] = 'list', [registry] = 'zset' }
if maxlen ~= '0' then wanted[events] = 'stream' end
for _, item in ipairs(items) do
  if item[1] == 'm' then wanted[stream_of(item[5])] = 'stream' else wanted[dead] = 'stream' end
end
if fetch > 0 then
  for k = 3, #KEYS do wanted[KEYS[k]] = 'list' end
end
for key, want in pairs(wanted) do
  local has = redis.call('TYPE', key).ok
  if has ~= 'none' and has ~= want then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. has .. ', not a ' .. want
      .. ' (no message was moved)')
  end
end

-- The holding list's oldest messages must be the expected ones, in order: those that are
-- (a prefix of the plan) are taken off the list and placed; the first that is not stops it.
local placed, codes, stopped = 0, {}, 0
if count > 0 then
  local tail = redis.call('LRANGE', held, -count, -1)
  for n = 1, count do
    if tail[#tail + 1 - n] ~= items[n][2] then
      stopped = 1
      break
    end
    placed = n
  end
  if placed > 0 then redis.call('LTRIM', held, 0, -placed - 1) end
end
for n = 1, placed do
  local item, raw = items[n], items[n][2]
  if item[1] == 'd' then
    redis.call('XADD', dead, '*', 'e', raw, 'reason', item[3], 'attempts', 0, 'at', at,
      'raw', '1')
    if maxlen ~= '0' then
      redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'dead',
        '{"at":' .. json_at .. ',"queue":' .. cjson.encode(dlq) .. ',"detail":' .. item[4] .. '}')
    end
    codes[#codes + 1] = 'd'
  else
    local id, task, queue = item[3], item[4], item[5]
    local record = prefix .. ':result:' .. id
    if redis.call('EXISTS', record) == 1 then
      codes[#codes + 1] = 'u'
    else
      redis.call('XADD', stream_of(queue), '*', 'e', item[6])
      redis.call('HSET', record, 'id', id, 'task', task, 'queue', queue, 'state', 'queued',
        'enqueued_at', at, 'updated_at', at)
      if maxlen ~= '0' then
        redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'sent',
          '{"at":' .. json_at .. ',"task_id":' .. cjson.encode(id) .. ',"task":'
          .. cjson.encode(task) .. ',"queue":' .. cjson.encode(queue)
          .. ',"detail":{"eta":null,"celery":true}}')
      end
      codes[#codes + 1] = 'm'
    end
  end
end

local fetched = {}
if fetch > 0 then
  -- Registered before anything is moved in: a list in the registry is swept once its time
  -- is past, so a node that dies now leaves nothing where no one looks.
  local time = redis.call('TIME')
  redis.call('ZADD', registry, tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    + ttl, held)
  local have = redis.call('LLEN', held)
  for k = 3, #KEYS do
    if have >= fetch then break end
    if KEYS[k] ~= held then
      -- The source's oldest messages, onto the holding list's head in the same order (as
      -- `LMOVE … RIGHT LEFT` one by one would, in three commands).
      local moved = redis.call('LRANGE', KEYS[k], have - fetch, -1)
      if #moved > 0 then
        redis.call('LTRIM', KEYS[k], 0, -#moved - 1)
        local chunk = {}
        for j = #moved, 1, -1 do
          chunk[#chunk + 1] = moved[j]
          if #chunk == 1000 or j == 1 then
            redis.call('LPUSH', held, unpack(chunk))
            chunk = {}
          end
        end
        have = have + #moved
      end
    end
  end
  if have > 0 then fetched = redis.call('LRANGE', held, -fetch, -1) end
end
return { placed, table.concat(codes), stopped, fetched }
