-- A reader's cursor is beyond the session's tail (a failover lost the last appends, which new
-- appends would then reuse): give the session a new stream-epoch generation, so the entries
-- appended from here carry it and every reader that saw the lost seqs is told.
--
-- KEYS[1] the session's meta, KEYS[2] the shard's epoch hash
-- ARGV[1] the reader's cursor, ARGV[2] the incarnation it follows
-- Returns false (no such incarnation), {seq, generation, -1} (the tail reached the cursor
--   meanwhile: nothing done), or {seq, new generation, good to}: the generation is
--   microseconds of the server's clock, above the session's and the shard's; good to is the
--   lowest tail any generation change of the session found.
local r = redis.call('HMGET', KEYS[1], L.META_SEQ, L.META_INCARNATION, L.META_GENERATION,
                     L.META_GENERATION_FROM)
if not r[1] or (r[2] or '') ~= ARGV[2] then return false end
local seq = tonumber(r[1])
if seq >= tonumber(ARGV[1]) then return {seq, r[3] or '', -1} end
local t = redis.call('TIME')
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = math.max(tonumber(r[3]) or 0,
                      tonumber(redis.call('HGET', KEYS[2], L.SHARD_GENERATION)) or 0)
if us <= last then us = last + 1 end
local gen = string.format('%016.0f', us)
local good = seq
if r[4] and tonumber(r[4]) and tonumber(r[4]) < good then good = tonumber(r[4]) end
ec_set(KEYS[1], L.META_GENERATION, gen, L.META_GENERATION_FROM, good)
return {seq, gen, good}
