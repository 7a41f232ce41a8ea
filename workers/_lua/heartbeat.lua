-- Renew a worker's session leases and keep its pending dispatch entries fresh (XCLAIM JUSTID
-- resets their idle time, so XAUTOCLAIM elsewhere leaves them alone).
--
-- KEYS[1] shard dispatch stream, then 2 keys per item: session meta, session lease
-- ARGV[1] worker id, ARGV[2] lease ttl (ms), ARGV[3] consumer group, then 2 args per item:
--   host epoch, dispatch entry id
-- Returns one code per item: 0 renewed, 1 lost (re-hosted or released elsewhere), 2 the lease
-- had lapsed but nobody took the session over, so it was taken back (same epoch: still safe)
local dispatch, me, ttl, group = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local out = {}
local ids = {}
for i = 1, (#KEYS - 1) / 2 do
  local kmeta, klease = KEYS[2 * i], KEYS[2 * i + 1]
  local epoch, id = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local m = redis.call('HMGET', kmeta, L.META_EPOCH, L.META_HOST, L.META_STATE)
  local holder = redis.call('GET', klease)
  if m[1] ~= epoch then
    out[i] = 1
  elseif holder == me then
    redis.call('PEXPIRE', klease, ttl)
    ids[#ids + 1] = id
    out[i] = 0
  elseif not holder and m[2] == me and m[3] == L.STATE_ACTIVE then
    redis.call('SET', klease, me, 'PX', ttl)
    ids[#ids + 1] = id
    out[i] = 2
  else
    out[i] = 1
  end
end
-- one XCLAIM for all of them: per call it costs about as much as the rest of a renewal
if #ids > 0 then
  ids[#ids + 1] = 'JUSTID'
  redis.call('XCLAIM', dispatch, group, me, 0, unpack(ids))
end
return out
