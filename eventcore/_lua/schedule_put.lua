-- Create, change or delete a schedule (eventcore._schedules), its hash and its place in the
-- shard's index together.
-- KEYS[1] the schedule's hash, KEYS[2] its shard's schedule index (zset)
-- ARGV[1] 'create' | 'update' | 'delete', ARGV[2] schedule id, and for create and update:
--   ARGV[3] definition JSON, ARGV[4] enabled '1' or '0', ARGV[5] next occurrence (ms) or ''
--   (disabled: scored +inf), ARGV[6] now (ms); update: ARGV[7] the revision the caller read
-- Returns: create {1} created, {0, definition} the id exists (nothing written);
--   update {1, revision} changed, {0} the revision moved on (read again), {-1} no such
--   schedule; delete {1} deleted, {0} there was none.
local op, id = ARGV[1], ARGV[2]
if op == 'delete' then
  redis.call('ZREM', KEYS[2], id)
  return {redis.call('DEL', KEYS[1])}
end
local score = ARGV[5]
if score == '' then score = '+inf' end
local rev
if op == 'create' then
  local existing = redis.call('HGET', KEYS[1], L.SCHEDULE_DEFINITION)
  if existing then return {0, existing} end
  rev = 1
  redis.call('HSET', KEYS[1], L.SCHEDULE_FIRED, 0, L.SCHEDULE_SKIPPED, 0)
else
  local cur = redis.call('HGET', KEYS[1], L.SCHEDULE_REVISION)
  if not cur then return {-1} end
  if cur ~= ARGV[7] then return {0} end
  rev = tonumber(cur) + 1
end
redis.call('HSET', KEYS[1], L.SCHEDULE_DEFINITION, ARGV[3], L.SCHEDULE_REVISION, rev,
  L.SCHEDULE_ENABLED, ARGV[4], L.SCHEDULE_NEXT, ARGV[5], L.SCHEDULE_UPDATED_AT, ARGV[6])
redis.call('ZADD', KEYS[2], score, id)
return {1, rev}
