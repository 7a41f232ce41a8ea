-- Drop a session from its shard's listing index once its keys have expired (a session with a
-- TTL ends and its keys expire; the index is a zset, whose members cannot expire).
-- KEYS[1] the shard's sessions index, KEYS[2] the session's meta hash.
-- ARGV[1] session id, ARGV[2] the score (incarnation) the lister saw.
-- Removes it only if the score is still that one (not a re-created session) and the session
-- has no metadata. Returns 1 when removed.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
