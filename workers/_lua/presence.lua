-- The presence registry of workers (Keys.presence): one hash field per worker, value
-- "<run id> <client id> <server run id> <expires ms> <alive|evicted>" (workers._presence).
-- Every change is a compare-and-set on the whole value, so a checker acts only on the
-- registration it saw: a worker that registered again meanwhile (a new connection, a new
-- process) is left alone.
--
-- KEYS[1] the registry; ARGV[1] mode, ARGV[2] worker id, then per mode:
--   register  ARGV[3] the new value: set it (a worker's own, fresh or refreshed)
--   evict     ARGV[3] the value seen, ARGV[4] the same marked evicted: the registered
--             connection is gone; its holder's leases may now be overridden by a claim
--   forget    ARGV[3] the value seen: drop it (expired, or evicted with nothing left)
--   leave     ARGV[3] the caller's run id: drop its own registration (a clean stop)
-- Returns 1 when done, 0 when the value was no longer what the caller saw.
local reg, mode, id = KEYS[1], ARGV[1], ARGV[2]
if mode == 'register' then
  redis.call('HSET', reg, id, ARGV[3])
  return 1
end
local cur = redis.call('HGET', reg, id)
if not cur then return 0 end
if mode == 'leave' then
  if string.sub(cur, 1, #ARGV[3] + 1) ~= ARGV[3] .. ' ' then return 0 end
  redis.call('HDEL', reg, id)
  return 1
end
if cur ~= ARGV[3] then return 0 end
if mode == 'evict' then
  redis.call('HSET', reg, id, ARGV[4])
elseif mode == 'forget' then
  redis.call('HDEL', reg, id)
else
  return redis.error_reply('unknown mode ' .. mode)
end
return 1
