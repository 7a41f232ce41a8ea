-- Trim a session stream below a seq the archive holds, if the archive's copy is of the
-- session's current incarnation (a session id deleted, or expired, and created again has a
-- new stream that the old one's archived rows say nothing about).
-- KEYS[1] session stream, KEYS[2] its metadata; ARGV[1] MINID, ARGV[2] incarnation.
-- Returns the number of entries trimmed.
if redis.call('EXISTS', KEYS[2]) == 0 or (redis.call('HGET', KEYS[2], L.META_INCARNATION) or '') ~= ARGV[2] then
  return 0
end
return redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
