-- commit.lua: writes task outcomes (RedisBroker's ack, retry, defer, dead letter, the starts of
-- attempts and the burial of malformed entries) — many in one call, each one all or nothing:
-- its record, the ack of its entry, the entry's next place and its events.
--
-- Why a script and a check first: neither MULTI/EXEC nor a script undoes the commands that ran
-- before one fails at run time, and a key of the wrong type (`SET p:result:<id> x`, a string
-- at `p:events`) fails its command at run time (WRONGTYPE). So, for each outcome, the type of
-- every key its commands write is known before its first write — it must hold what the
-- command needs, or nothing — and only then do the commands run. Past that nothing they do can
-- fail: arguments are well formed, stream ids are `*`, and Redis refuses a script's writes for
-- memory (maxmemory) only before its first write, not in the middle.
--
-- Cheap for many outcomes at once:
-- - a key's type is asked once per call (TYPE), not once per outcome: our own commands only
--   ever give a key the type they need;
-- - an outcome's first command (its record's HSET: a key no other outcome writes) is its own
--   check: it runs first, with pcall, once every other key of the outcome is known good; if it
--   fails nothing of that outcome has been written;
-- - `XACK <stream> <group> <entry>` here stands for the release of an entry — acked and deleted:
--   the entries of every outcome written go out at the end, one XACK and one XDEL per stream.
--
-- KEYS = every key the commands write (declared; each command names its key itself).
-- ARGV = the outcomes, one after the other: the number of commands, then for each command its
-- number of arguments followed by the arguments (name first, in capitals, key second).
-- Returns one value per outcome: 1 when written, else the error (nothing of it was written).
local needs = {
  XADD = 'stream', XACK = 'stream', HSET = 'hash', ZADD = 'zset',
  PEXPIRE = false, PERSIST = false, DEL = false,
}

local held = {}
local function type_of(key)
  local t = held[key]
  if t == nil then
    t = redis.call('TYPE', key).ok
    held[key] = t
  end
  return t
end

local function refused(key, has, need)
  return 'WRONGTYPE ' .. key .. ' holds a ' .. has .. ', not a ' .. need
    .. ' (nothing of this outcome was written)'
end

-- stream -> { group, ids }, and the streams in the order first met.
local releases, streams = {}, {}
local function release(stream, group, id)
  local r = releases[stream]
  if r == nil then
    r = { group, {} }
    releases[stream] = r
    table.insert(streams, stream)
  end
  table.insert(r[2], id)
end

-- Where each command of the outcome at hand starts in ARGV, and where it ends.
local from, last = {}, {}
local i, out = 1, {}
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  i = i + 1
  for c = 1, count do
    from[c] = i + 1
    last[c] = i + tonumber(ARGV[i])
    i = last[c] + 1
  end
  -- The first command is its own check when it writes a key new to this call (a record).
  local first, first_key = ARGV[from[1]], ARGV[from[1] + 1]
  local checks_itself = count > 0 and needs[first] and first ~= 'XACK' and held[first_key] == nil
  local problem
  for c = 1, count do
    local name, key = ARGV[from[c]], ARGV[from[c] + 1]
    local need = needs[name]
    if need == nil then
      problem = 'ERR commit.lua: unsupported command ' .. name
    elseif need and not (c == 1 and checks_itself) then
      local has = type_of(key)
      if has ~= 'none' and has ~= need then
        problem = refused(key, has, need)
      end
    end
    if problem then break end
  end
  local next = 1
  if not problem and checks_itself then
    local done = redis.pcall(unpack(ARGV, from[1], last[1]))
    if type(done) == 'table' and done.err then
      local need, has = needs[first], redis.call('TYPE', first_key).ok
      if has ~= 'none' and has ~= need then
        problem = refused(first_key, has, need)
      else
        problem = done.err
      end
    else
      held[first_key] = needs[first]
      next = 2
    end
  end
  if problem then
    table.insert(out, problem)
  else
    for c = next, count do
      if ARGV[from[c]] == 'XACK' then
        release(ARGV[from[c] + 1], ARGV[from[c] + 2], ARGV[from[c] + 3])
      else
        redis.call(unpack(ARGV, from[c], last[c]))
      end
    end
    table.insert(out, 1)
  end
end

-- One XACK and one XDEL per stream for every entry released above (in slices: unpack's
-- arguments live on the C stack).
for _, stream in ipairs(streams) do
  local group, ids = releases[stream][1], releases[stream][2]
  for from_id = 1, #ids, 1000 do
    local to_id = math.min(from_id + 999, #ids)
    redis.call('XACK', stream, group, unpack(ids, from_id, to_id))
    redis.call('XDEL', stream, unpack(ids, from_id, to_id))
  end
end
return out
