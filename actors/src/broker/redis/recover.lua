-- recover.lua: one batch of the recovery sweep of one queue (RedisBroker::recover).
-- Entries pending longer than the lease go back to the stream tail with d + 1, or to the dead
-- letters once d + 1 reaches max_deliveries; the old entry is acked and deleted. Atomic, so
-- every node may sweep at once without duplicating anything. A dead-lettered entry's record
-- (`p:result:<id>`) says dead with the reason and gets the result TTL, as for any task that
-- ended; a requeued entry's record marks its attempt lost (`lost` = 1): it no longer runs,
-- it waits to be taken again (its start still counts). A record key of another type is left alone (the entry still
-- moves: losing the entry would be worse than a record not written).
--
-- KEYS[1] = p:{q}:stream, KEYS[2] = p:{q}:dead
-- ARGV[1] = group, ARGV[2] = lease (ms), ARGV[3] = max_deliveries, ARGV[4] = now (RFC 3339),
-- ARGV[5] = batch size, ARGV[6] = record prefix (`p:result:`), ARGV[7] = result TTL (ms)
-- Returns { requeued, dead, more (0/1), then per entry: kind, e, deliveries, consumer }.
local stream, dead = KEYS[1], KEYS[2]
local group, lease, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, batch = ARGV[4], tonumber(ARGV[5])

local function text(value)
  return type(value) == 'string' and value or ''
end

local pending = redis.call('XPENDING', stream, group, 'IDLE', lease, '-', '+', batch)
local out = { 0, 0, (#pending >= batch) and 1 or 0 }
for _, p in ipairs(pending) do
  local id, consumer = p[1], p[2]
  local found = redis.call('XRANGE', stream, id, id)
  if #found > 0 then
    local fields = found[1][2]
    local e, d = nil, 0
    for i = 1, #fields, 2 do
      if fields[i] == 'e' then
        e = fields[i + 1]
      elseif fields[i] == 'd' then
        d = tonumber(fields[i + 1]) or 0
      end
    end
    -- The envelope, when `e` is one, and its record's key (nil when that key holds another type).
    local envelope, record
    if e then
      local ok, decoded = pcall(cjson.decode, e)
      if ok and type(decoded) == 'table' then
        envelope = decoded
        if type(decoded.id) == 'string' and decoded.id ~= '' then
          record = ARGV[6] .. decoded.id
          local held = redis.call('TYPE', record).ok
          if held ~= 'none' and held ~= 'hash' then record = nil end
        end
      end
    end
    local delivered = d + 1
    local kind
    if e and delivered < max then
      redis.call('XADD', stream, '*', 'e', e, 'd', delivered)
      if record then
        redis.call('HSET', record, 'lost', '1')
      end
      out[1] = out[1] + 1
      kind = 'recovered'
    else
      local reason, attempts, raw
      if e then
        reason = 'delivered ' .. delivered .. ' times without an ack (max_deliveries = ' .. max .. ')'
        if envelope then
          attempts = (tonumber(envelope.attempt) or 0) + 1
        else
          attempts, raw = 0, true
        end
      else
        reason, attempts, raw = 'malformed entry: no field `e`', 0, true
      end
      if raw then
        redis.call('XADD', dead, '*', 'e', e or '', 'reason', reason, 'attempts', attempts,
          'at', now, 'raw', '1')
      else
        redis.call('XADD', dead, '*', 'e', e, 'reason', reason, 'attempts', attempts, 'at', now)
      end
      if record then
        redis.call('HSET', record, 'id', envelope.id, 'task', text(envelope.task),
          'queue', text(envelope.queue), 'state', 'dead', 'error', reason, 'due', '',
          'updated_at', now)
        redis.call('PEXPIRE', record, ARGV[7])
      end
      out[2] = out[2] + 1
      kind = 'dead'
    end
    table.insert(out, kind)
    table.insert(out, e or '')
    table.insert(out, delivered)
    table.insert(out, consumer)
  end
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
return out
