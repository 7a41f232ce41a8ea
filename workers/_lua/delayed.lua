-- Move due retries from the shard's delayed set to its dispatch stream, atomically (so two
-- workers running this at once never dispatch a retry twice).
-- KEYS[1] delayed set, KEYS[2] dispatch stream; ARGV[1] now (ms), ARGV[2] most to move
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, sid in ipairs(due) do
  redis.call('ZREM', KEYS[1], sid)
  ec_dispatch(KEYS[2], sid, 'retry')
end
return #due
