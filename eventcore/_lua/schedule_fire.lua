-- Fire one occurrence of a schedule: advance the schedule past it and create its session, in
-- one step (eventcore._schedules). Loaded after the layout table L, the prelude and the append
-- script wrapped as the function ec_append(KEYS, ARGV): the session is written by the one
-- append script, unchanged, inside this script's atomic step.
--
-- KEYS[1] the schedule's hash, KEYS[2] its shard's schedule index (zset), then, when a session
--   is started, the append script's keys (as Appender.script_call lays them out)
--   All in one slot: the session id was chosen on the schedule's shard.
-- ARGV[1] schedule id, ARGV[2] the next occurrence the caller read (ms), ARGV[3] the revision
--   it read, ARGV[4] the occurrence to fire (ms; '' = none, only move next ahead), ARGV[5] the
--   new next occurrence (ms), ARGV[6] the session id, ARGV[7] how many occurrences the
--   catch-up policy skips in this step, then the append script's ARGV (session.created and
--   the first input)
-- Returns {1, created, writes} fired (created: the append's answer, {seq, incarnation}, or -1
--   when the session id already existed; writes: the shard's write counter it answered),
--   {1, ''} moved ahead without a session, {0} the schedule is not where the caller read it
--   (another process fired it, or it was changed, disabled or deleted): nothing written, {2, 'code:detail'} the append refused: nothing written.
local cur = redis.call('HMGET', KEYS[1], L.SCHEDULE_NEXT, L.SCHEDULE_REVISION,
  L.SCHEDULE_ENABLED)
if cur[1] ~= ARGV[2] or cur[2] ~= ARGV[3] or cur[3] ~= '1' then return {0} end
local created, writes = '', nil
local set = {L.SCHEDULE_NEXT, ARGV[5]}
if ARGV[4] ~= '' then
  local akeys, aargv = {}, {}
  for i = 3, #KEYS do akeys[#akeys + 1] = KEYS[i] end
  for i = 8, #ARGV do aargv[#aargv + 1] = ARGV[i] end
  local out = ec_append(akeys, aargv)
  if out.err then return out end
  created, writes = out[1], out[#out]
  if type(created) == 'string' then return {2, created} end
  set[3], set[4], set[5], set[6] = L.SCHEDULE_LAST_RUN, ARGV[4], L.SCHEDULE_LAST_SESSION, ARGV[6]
  if created ~= -1 then redis.call('HINCRBY', KEYS[1], L.SCHEDULE_FIRED, 1) end
end
if tonumber(ARGV[7]) > 0 then redis.call('HINCRBY', KEYS[1], L.SCHEDULE_SKIPPED, ARGV[7]) end
redis.call('HSET', KEYS[1], unpack(set))
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return {1, created, writes}
