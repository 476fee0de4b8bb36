-- take.lua: moves up to one batch of Celery messages from the kombu lists of one queue into
-- the runtime's streams (celery::bridge), atomically: a message is either still in its kombu
-- list or in exactly one runtime stream (or, when malformed, in the dead letters) — never in
-- two places and never in none, whenever the calling process dies.
--
-- KEYS = the lists drained, in order: holding lists of other nodes' bridges found holding
-- messages (sweep.lua), this bridge's holding list (filled by its BLMOVE), then the kombu lists
-- in priority order (`q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`).
-- ARGV[1] = runtime key prefix (`rt`), ARGV[2] = batch size,
-- ARGV[3] = JSON {celery task name: [runtime task, runtime queue]},
-- ARGV[4] = runtime queue whose dead letters take malformed messages,
-- ARGV[5] = now (RFC 3339), ARGV[6] = events stream MAXLEN
-- ('0': no events), ARGV[7] = the longest task id (bytes, broker::MAX_ID_BYTES).
-- Producers LPUSH (and BLMOVE pushes LEFT), so the oldest message is at the right end: RPOP
-- keeps FIFO.
-- The runtime stream entry is an envelope with `id` (Celery's, kept), `task`, `queue` and
-- `celery_raw` (the kombu message as it came); the body is decoded by the consumer
-- (celery::expand), which dead-letters what it cannot decode.
--
-- Task ids follow the runtime's rule (broker::check_id, the same checks here): an id that is
-- empty, too long, holds a control character or is `.`/`..` is dead-lettered. A good id is
-- checked like any chosen id, against its record (`p:result:<id>`, in this same step): a
-- message whose id has one — its task is queued, running, retried, or ended less than
-- result_ttl ago — is a duplicate (a producer that published twice, a message restored after
-- a crash) and is dropped, not run again. Otherwise its record is written (`queued`, no TTL)
-- with its XADD, so a message is never taken for a duplicate of itself.
--
-- Every key it writes is type-checked before the first RPOP: a runtime stream, the dead
-- letters or the events stream holding another type fails the call with nothing moved (a
-- message popped and then not added would be lost).
--
-- Returns {moved, dead letters, {id, reason, id, reason, ...}, {duplicate id, ...}}: the
-- dead-lettered messages that had a usable id, for the bridge to write their FAILURE result
-- (so `.get()` raises), and the ids of the duplicates dropped.
local prefix, batch = ARGV[1], tonumber(ARGV[2])
local map = cjson.decode(ARGV[3])
local dlq, at, maxlen = ARGV[4], ARGV[5], ARGV[6]
local max_id = tonumber(ARGV[7])
local events = prefix .. ':events'
local moved, dead = 0, 0
local rejected, duplicates = {}, {}

local function stream_of(queue)
  return prefix .. ':{' .. queue .. '}:stream'
end

local writes = { [prefix .. ':{' .. dlq .. '}:dead'] = true }
if maxlen ~= '0' then writes[events] = true end
for _, target in pairs(map) do
  if type(target) == 'table' and type(target[2]) == 'string' then
    writes[stream_of(target[2])] = true
  end
end
for key in pairs(writes) do
  local held = redis.call('TYPE', key).ok
  if held ~= 'none' and held ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held
      .. ', not a stream (no message was moved)')
  end
end

-- Whether `s` is valid UTF-8 (what a Rust String holds: no overlong forms, no surrogates).
local function utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c, len, lo, hi = s:byte(i), 1, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    elseif c >= 0x80 then return false end
    for j = i + 1, i + len - 1 do
      local b = s:byte(j)
      if not b or b < lo or b > hi then return false end
      lo, hi = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end

-- Why a task id is refused (broker::check_id), or nil.
local function bad_id(id)
  if #id > max_id then
    return 'is ' .. #id .. ' bytes, over the limit of ' .. max_id
  elseif not utf8(id) then
    return 'is not valid UTF-8'
  elseif id:find('[%z\1-\31\127]') or id:find('\194[\128-\159]') then
    return 'holds a control character'
  elseif id == '.' or id == '..' then
    return '`' .. id .. '` cannot be read back at GET /tasks/{id}'
  end
end

local function bury(raw, reason)
  redis.call('XADD', prefix .. ':{' .. dlq .. '}:dead', '*', 'e', raw, 'reason', reason,
    'attempts', 0, 'at', at, 'raw', '1')
  if maxlen ~= '0' then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'kind', 'dead', 'at', at,
      'queue', dlq, 'detail', cjson.encode({ reason = reason }))
  end
  dead = dead + 1
end

for _, list in ipairs(KEYS) do
  while moved + dead + #duplicates < batch do
    local raw = redis.call('RPOP', list)
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local headers = ok and type(msg) == 'table' and msg.headers
    if type(headers) ~= 'table' then
      bury(raw, 'celery: not a kombu message (JSON with `headers`)')
    elseif type(headers.id) ~= 'string' or headers.id == '' then
      bury(raw, 'celery: message without `headers.id`')
    elseif bad_id(headers.id) then
      bury(raw, 'celery: `headers.id` ' .. bad_id(headers.id))
    elseif type(headers.task) ~= 'string' then
      bury(raw, 'celery: message without `headers.task` (only protocol v2 is supported)')
    else
      local target = map[headers.task]
      if type(target) ~= 'table' then
        local reason = 'celery: task `' .. headers.task .. '` is not mapped to a runtime task'
        bury(raw, reason)
        table.insert(rejected, headers.id)
        table.insert(rejected, reason)
      elseif redis.call('EXISTS', prefix .. ':result:' .. headers.id) == 1 then
        table.insert(duplicates, headers.id)
      else
        local envelope = '{"id":' .. cjson.encode(headers.id)
          .. ',"task":' .. cjson.encode(target[1])
          .. ',"queue":' .. cjson.encode(target[2])
          .. ',"enqueued_at":' .. cjson.encode(at)
          .. ',"celery_raw":' .. cjson.encode(raw) .. '}'
        redis.call('XADD', stream_of(target[2]), '*', 'e', envelope)
        redis.call('HSET', prefix .. ':result:' .. headers.id, 'id', headers.id,
          'task', target[1], 'queue', target[2], 'state', 'queued', 'enqueued_at', at,
          'updated_at', at)
        if maxlen ~= '0' then
          redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'kind', 'sent', 'at', at,
            'task_id', headers.id, 'task', target[1], 'queue', target[2],
            'detail', '{"eta":null,"celery":true}')
        end
        moved = moved + 1
      end
    end
  end
end
return { moved, dead, rejected, duplicates }
