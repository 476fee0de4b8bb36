-- purge.lua: removes one batch of the ready entries of one queue — those after the consumer
-- group's last-delivered-id, which nobody has reserved — and one batch of its delayed set
-- (RedisBroker::purge). In-flight entries are left to finish. The record of every removed
-- entry is deleted with it (its id is free again: nothing of the task is left).
--
-- KEYS[1] = p:{q}:stream, KEYS[2] = p:{q}:delayed
-- ARGV[1] = group, ARGV[2] = batch size, ARGV[3] = record prefix (`p:result:`)
-- Returns { ready removed, delayed removed, more (0/1) }.
local stream, delayed = KEYS[1], KEYS[2]
local group, batch, records = ARGV[1], tonumber(ARGV[2]), ARGV[3]

for key, need in pairs({ [stream] = 'stream', [delayed] = 'zset' }) do
  local held = redis.call('TYPE', key).ok
  if held ~= 'none' and held ~= need then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held .. ', not a ' .. need)
  end
end

-- Deletes the record of the envelope JSON `e`, if it names an id.
local function free(e)
  local ok, envelope = pcall(cjson.decode, e)
  if ok and type(envelope) == 'table' and type(envelope.id) == 'string' and envelope.id ~= '' then
    redis.call('DEL', records .. envelope.id)
  end
end

local due = redis.call('ZRANGE', delayed, 0, batch - 1)
for _, member in ipairs(due) do
  free(member)
end
if #due > 0 then
  redis.call('ZREM', delayed, unpack(due))
end

local ids = {}
if redis.call('EXISTS', stream) == 1 then
  local start = '-'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then
        name = g[i + 1]
      elseif g[i] == 'last-delivered-id' then
        last = g[i + 1]
      end
    end
    if name == group and last then
      start = '(' .. last
    end
  end
  for i, entry in ipairs(redis.call('XRANGE', stream, start, '+', 'COUNT', batch)) do
    ids[i] = entry[1]
    local fields = entry[2]
    for f = 1, #fields, 2 do
      if fields[f] == 'e' then
        free(fields[f + 1])
      end
    end
  end
  if #ids > 0 then
    redis.call('XDEL', stream, unpack(ids))
  end
end
local more = (#ids >= batch or #due >= batch) and 1 or 0
return { #ids, #due, more }
