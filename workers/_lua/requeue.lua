-- Put dispatch entries this worker read but never claimed back at the end of the stream, for
-- any worker to take (drain). Entries no longer pending to this worker are left alone.
-- KEYS[1] dispatch stream; ARGV[1] consumer group, ARGV[2] worker id, then per entry:
--   entry id, session id
-- Returns how many were requeued.
local n = 0
for i = 3, #ARGV, 2 do
  local id, sid = ARGV[i], ARGV[i + 1]
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    ec_dispatch(KEYS[1], sid, 'requeue')
    n = n + 1
  end
end
return n
