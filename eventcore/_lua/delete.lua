-- Delete one incarnation of a session: its keys and its projected view, and a session.deleted
-- entry on the shard feed so subscribers purge what they keep of it (persistence's rows).
-- KEYS[1..6] stream, meta, dedupe, signals, effects, lease; KEYS[7] view; KEYS[8] shard feed;
-- KEYS[9] (optional) the shard's sessions index, from which the session is removed.
-- ARGV[1] the incarnation to delete, ARGV[2] the session id, ARGV[3] the session.deleted
-- envelope JSON without seq and without its opening brace.
-- Returns 1 when deleted, 0 when there is no such session or it is another incarnation now.
local cur = redis.call('HMGET', KEYS[2], L.META_SEQ, L.META_INCARNATION)
if not cur[1] or (cur[2] or '') ~= ARGV[1] then return 0 end
local seq = tostring((tonumber(cur[1]) or 0) + 1)  -- after everything the session held
ec_feed_entry(KEYS[8], ARGV[2], seq, ARGV[1], L.SESSION_DELETED, ec_body(seq, ARGV[3]), '',
  false)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
if KEYS[9] then redis.call('ZREM', KEYS[9], ARGV[2]) end
return 1
