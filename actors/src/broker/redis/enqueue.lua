-- enqueue.lua: enqueues a batch in which some envelope carries an idempotency key or an id the
-- producer chose (RedisBroker::enqueue; a batch of generated ids without keys is a plain
-- pipeline). Per envelope, in order: its idempotency key is claimed (SET NX PX; taken → a
-- duplicate of the id the key holds), then — for a chosen id — its record is looked at (the
-- id's guard: a record exists while the task's entry does and result_ttl after its outcome;
-- there → a duplicate of that id), then the entry is written (XADD to the stream, or ZADD to
-- the delayed set for a future eta) with its record (HSET of the fields it is given, no TTL) and its `sent` event. Claim and write are one atomic step: a key is never taken
-- for an entry that was not written, and an entry never lacks its record.
--
-- Every key written is type-checked before the first write (see commit.lua for why): a key of
-- the wrong type fails the whole batch with nothing written.
--
-- KEYS = every key it may write (declared; the arguments name them).
-- ARGV[1] = events stream, ARGV[2] = its MAXLEN ('0': no events),
-- then 10 fields per envelope: target key (stream or delayed set), due ms ('' → stream),
-- envelope JSON, id, record key, chosen ('1' → the id is checked), idempotency key ('' →
-- none), its TTL (ms), the `sent` event's value (the event as one field, `sent` → its JSON:
-- events::xadd_event), record (its hash fields as a JSON array name, value, …:
-- StoredRecord::enqueued, encoded by codec::record_fields).
-- Returns per envelope '' (written) or the id it duplicates.
local events, maxlen = ARGV[1], ARGV[2]
local FIELDS, FIRST = 10, 3

local function check(key, need)
  local held = redis.call('TYPE', key).ok
  if held ~= 'none' and held ~= need then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held .. ', not a ' .. need
      .. ' (nothing of this batch was enqueued)')
  end
end

local problem = maxlen ~= '0' and check(events, 'stream')
for i = FIRST, #ARGV, FIELDS do
  if problem then return problem end
  problem = check(ARGV[i], ARGV[i + 1] == '' and 'stream' or 'zset')
    or check(ARGV[i + 4], 'hash')
  if not problem and ARGV[i + 6] ~= '' then
    problem = check(ARGV[i + 6], 'string')
  end
end
if problem then return problem end

local out = {}
for i = FIRST, #ARGV, FIELDS do
  local target, due, json, id, record, chosen, idem, ttl, sent, fields =
    unpack(ARGV, i, i + FIELDS - 1)
  local first
  if idem ~= '' and not redis.call('SET', idem, id, 'NX', 'PX', ttl) then
    first = redis.call('GET', idem)
  end
  if not first and chosen == '1' and redis.call('EXISTS', record) == 1 then
    first = id
  end
  if first then
    table.insert(out, first)
  else
    if due == '' then
      redis.call('XADD', target, '*', 'e', json)
    else
      redis.call('ZADD', target, due, json)
    end
    redis.call('HSET', record, unpack(cjson.decode(fields)))
    if maxlen ~= '0' then
      redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'sent', sent)
    end
    table.insert(out, '')
  end
end
return out
