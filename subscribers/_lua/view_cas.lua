-- Store a session's view if nobody moved it since it was read (compare-and-set on its seq), and
-- only while its incarnation is the session's: a deleted (or replaced) session is never
-- projected again, even by a consumer that read it just before the delete.
-- KEYS[1] view hash, KEYS[2] the session's metadata hash (same slot).
-- ARGV[1] incarnation, ARGV[2] expected seq, ARGV[3] new seq, ARGV[4] view JSON,
-- ARGV[5] seconds to keep it ('' = no expiry).
-- Returns -1 when stored, -2 when the incarnation is not the session's (nothing stored), else
-- the current seq. A view of another (older) incarnation counts as seq 0: a run from 0
-- replaces it.
if redis.call('EXISTS', KEYS[2]) == 0 or (redis.call('HGET', KEYS[2], L.META_INCARNATION) or '') ~= ARGV[1] then
  return -2
end
local v = redis.call('HMGET', KEYS[1], L.VIEW_SEQ, L.VIEW_INCARNATION)
local same = (v[2] or '') == ARGV[1]
local cur = same and (tonumber(v[1] or '0') or 0) or 0
if cur ~= tonumber(ARGV[2]) then return cur end
if not same then redis.call('DEL', KEYS[1]) end  -- its fields and its expiry go with it
redis.call('HSET', KEYS[1], L.VIEW_SEQ, ARGV[3], L.VIEW_VALUE, ARGV[4], L.VIEW_INCARNATION,
  ARGV[1])
if ARGV[5] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return -1
