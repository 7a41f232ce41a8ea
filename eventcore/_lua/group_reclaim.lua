-- Reclaim stream entries left idle by dead or stuck consumers, for one (group, shard). Fenced
-- by a lease when ARGV[2] > 0: only the lease holder claims, and holding the lease and claiming
-- are one atomic step, so a reclaimer whose lease lapsed (paused, partitioned) claims nothing.
-- The lease expires on its own, so a killed reclaimer blocks nobody for longer than the lease.
--
-- KEYS[1] lease, KEYS[2] stream, KEYS[3] dead-letter stream
-- ARGV[1] this consumer (the lease token), ARGV[2] lease ms (0: no fence), ARGV[3] group,
-- ARGV[4] min idle ms, ARGV[5] cursor, ARGV[6] count, ARGV[7] max deliveries (0: no limit
-- here, the caller judges the counts), ARGV[8] dead-letter error JSON, ARGV[9] dead-letter kind
--
-- Returns {0, holder} when another consumer holds the lease, else
-- {1, next cursor, {{id, deliveries, {field, value, ...}}, ...}, dead-lettered count}.
-- Entries already delivered max deliveries times (XAUTOCLAIM counts itself as one more) go to
-- the dead-letter stream with their fields, and are acknowledged, in the same step.
local me, group = ARGV[1], ARGV[3]
if tonumber(ARGV[2]) > 0 then
  local holder = redis.call('GET', KEYS[1])
  if holder and holder ~= me then return {0, holder} end
  redis.call('SET', KEYS[1], me, 'PX', ARGV[2])
end
local r = redis.call('XAUTOCLAIM', KEYS[2], group, me, ARGV[4], ARGV[5], 'COUNT', ARGV[6])
local max = tonumber(ARGV[7])
local out, dead, claimed, missing = {}, 0, {}, false
for _, e in ipairs(r[2]) do
  if e then
    local id = e[1]
    claimed[id] = true
    local p = redis.call('XPENDING', KEYS[2], group, id, id, 1)
    local n = (p[1] and tonumber(p[1][4])) or 1
    if max > 0 and n > max then
      ec_dead_entry(KEYS[3], group, me, KEYS[2], id, tostring(n - 1), ARGV[8], ARGV[9], e[2])
      redis.call('XACK', KEYS[2], group, id)
      dead = dead + 1
    else
      out[#out + 1] = {id, n, e[2]}
    end
  else
    missing = true
  end
end
if missing then
  -- Redis 6.2 returns deleted entries as nil and keeps them pending (7.0 drops them): they
  -- can never be processed, so acknowledge them.
  local last = r[1] == '0-0' and '+' or r[1]
  for _, p in ipairs(redis.call('XPENDING', KEYS[2], group, ARGV[5], last, ARGV[6], me)) do
    if not claimed[p[1]] and #redis.call('XRANGE', KEYS[2], p[1], p[1]) == 0 then
      redis.call('XACK', KEYS[2], group, p[1])
    end
  end
end
return {1, r[1], out, dead}
