-- take.lua: moves up to one batch of Celery messages from the kombu lists of one queue into
-- the runtime's streams (celery::bridge), atomically: a message is either still in its kombu
-- list or in exactly one runtime stream (or, when malformed, in the dead letters) — never in
-- two places and never in none, whenever the calling process dies.
--
-- KEYS = the kombu lists in priority order (`q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`).
-- ARGV[1] = runtime key prefix (`rt`), ARGV[2] = batch size,
-- ARGV[3] = JSON {celery task name: [runtime task, runtime queue]},
-- ARGV[4] = runtime queue whose dead letters take malformed messages,
-- ARGV[5] = now (RFC 3339), ARGV[6] = events stream MAXLEN
-- ('0': no events).
-- Producers LPUSH, so the oldest message is at the right end: RPOP keeps FIFO.
-- The runtime stream entry is an envelope with `id` (Celery's, kept), `task`, `queue` and
-- `celery_raw` (the kombu message as it came); the body is decoded by the consumer
-- (celery::expand), which dead-letters what it cannot decode.
-- Returns {moved, dead letters, {id, reason, id, reason, ...}}: the dead-lettered messages that
-- had an id, for the bridge to write their FAILURE result (so `.get()` raises).
local prefix, batch = ARGV[1], tonumber(ARGV[2])
local map = cjson.decode(ARGV[3])
local dlq, at, maxlen = ARGV[4], ARGV[5], ARGV[6]
local events = prefix .. ':events'
local moved, dead = 0, 0
local rejected = {}

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
  while moved + dead < batch do
    local raw = redis.call('RPOP', list)
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local headers = ok and type(msg) == 'table' and msg.headers
    if type(headers) ~= 'table' then
      bury(raw, 'celery: not a kombu message (JSON with `headers`)')
    elseif type(headers.id) ~= 'string' or headers.id == '' then
      bury(raw, 'celery: message without `headers.id`')
    elseif type(headers.task) ~= 'string' then
      bury(raw, 'celery: message without `headers.task` (only protocol v2 is supported)')
    else
      local target = map[headers.task]
      if type(target) ~= 'table' then
        local reason = 'celery: task `' .. headers.task .. '` is not mapped to a runtime task'
        bury(raw, reason)
        table.insert(rejected, headers.id)
        table.insert(rejected, reason)
      else
        local envelope = '{"id":' .. cjson.encode(headers.id)
          .. ',"task":' .. cjson.encode(target[1])
          .. ',"queue":' .. cjson.encode(target[2])
          .. ',"enqueued_at":' .. cjson.encode(at)
          .. ',"celery_raw":' .. cjson.encode(raw) .. '}'
        redis.call('XADD', prefix .. ':{' .. target[2] .. '}:stream', '*', 'e', envelope)
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
return { moved, dead, rejected }
