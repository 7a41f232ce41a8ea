-- Store a session's view if nobody moved it since it was read (compare-and-set on its seq).
-- KEYS[1] view hash; ARGV[1] expected seq, ARGV[2] new seq, ARGV[3] view JSON,
-- ARGV[4] seconds to keep it ('' = no expiry). Returns -1 when stored, else the current seq.
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if cur ~= tonumber(ARGV[1]) then return cur end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'v', ARGV[3])
if ARGV[4] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return -1
