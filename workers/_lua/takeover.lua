-- Take over the dispatch entries an evicted worker (its presence connection closed: the
-- process died) still has pending on one shard: XCLAIM them to the caller at once, counted as
-- a delivery like a reclaim after the lease TTL. claim.lua, told the evicted worker's id, then
-- hosts each of them with an epoch bump (the dead host's writes are fenced from then on).
--
-- KEYS[1] shard dispatch stream; ARGV[1] consumer group, ARGV[2] the evicted worker,
--   ARGV[3] the caller, ARGV[4] most entries
-- Returns XCLAIM's reply: {entry id, {field, value, ...}} per entry still in the stream.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])
if #p == 0 then return {} end
local ids = {}
for i, e in ipairs(p) do ids[i] = e[1] end
return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
