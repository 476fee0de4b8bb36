-- commit.lua: writes task outcomes (RedisBroker's ack, retry, defer, dead letter, and the
-- burial of malformed entries), each one all or nothing: its record, the ack of its entry, the
-- entry's next place (delayed set, dead letters) and its events.
--
-- Why a script and a check first: neither MULTI/EXEC nor a script undoes the commands that ran
-- before one fails at run time, and a key of the wrong type (`SET p:result:<id> x`, a string
-- at `p:events`) fails its command at run time (WRONGTYPE). So, for each outcome, the type of
-- every key its commands write is checked first — it must hold what the command needs, or
-- nothing — and only then do the commands run. Past that check nothing they do can fail:
-- arguments are well formed, stream ids are `*`, and Redis refuses a script's writes for
-- memory (maxmemory) only before its first write, not in the middle.
--
-- KEYS = every key the commands write (declared; each command names its key itself).
-- ARGV = the outcomes, one after the other: the number of commands, then for each command its
-- number of arguments followed by the arguments (name first, key second).
-- Returns one value per outcome: 1 when written, else the error (nothing of it was written).
local needs = {
  XADD = 'stream', XACK = 'stream', XDEL = 'stream',
  HSET = 'hash', HDEL = 'hash', ZADD = 'zset', PEXPIRE = false, PERSIST = false,
}

local i, out = 1, {}
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  i = i + 1
  local commands = {}
  for c = 1, count do
    local n = tonumber(ARGV[i])
    commands[c] = { unpack(ARGV, i + 1, i + n) }
    i = i + 1 + n
  end
  local problem, held = nil, {}
  for _, command in ipairs(commands) do
    local name, key = string.upper(command[1]), command[2]
    local need = needs[name]
    if need == nil then
      problem = 'ERR commit.lua: unsupported command ' .. name
    elseif need then
      held[key] = held[key] or redis.call('TYPE', key).ok
      if held[key] ~= 'none' and held[key] ~= need then
        problem = 'WRONGTYPE ' .. key .. ' holds a ' .. held[key] .. ', not a ' .. need
          .. ' (nothing of this outcome was written)'
      end
    end
    if problem then break end
  end
  if problem then
    table.insert(out, problem)
  else
    for _, command in ipairs(commands) do
      redis.call(unpack(command))
    end
    table.insert(out, 1)
  end
end
return out
