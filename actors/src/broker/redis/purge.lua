-- purge.lua: removes one batch of ready entries of one queue — those after the consumer
-- group's last-delivered-id, which nobody has reserved — and, in the first batch, the delayed
-- set (RedisBroker::purge). In-flight entries are left to finish.
--
-- KEYS[1] = p:{q}:stream, KEYS[2] = p:{q}:delayed
-- ARGV[1] = group, ARGV[2] = batch size, ARGV[3] = "1" to drop the delayed set too
-- Returns { ready removed, delayed removed, more (0/1) }.
local delayed = 0
if ARGV[3] == '1' then
  delayed = redis.call('ZCARD', KEYS[2])
  redis.call('DEL', KEYS[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return { 0, delayed, 0 }
end
local start = '-'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then
      name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then
      last = g[i + 1]
    end
  end
  if name == ARGV[1] and last then
    start = '(' .. last
  end
end
local batch = tonumber(ARGV[2])
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', batch)
local ids = {}
for i, entry in ipairs(entries) do
  ids[i] = entry[1]
end
if #ids > 0 then
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return { #ids, delayed, (#ids >= batch) and 1 or 0 }
