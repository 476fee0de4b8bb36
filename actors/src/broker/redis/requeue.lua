-- requeue.lua: moves dead letters back to the stream (RedisBroker::requeue_dead). The caller
-- read them and rewrote each envelope with attempt = 0; a letter moves only if it is still in
-- the dead-letter stream (XDEL says so), so two nodes requeuing at once never duplicate one.
--
-- KEYS[1] = p:{q}:dead, KEYS[2] = p:{q}:stream
-- ARGV = dead entry id, new envelope JSON, dead entry id, new envelope JSON, ...
-- Returns how many moved.
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'e', ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
