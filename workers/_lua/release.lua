-- Hand a hosted session back, fenced by the host epoch: nothing happens (result 'stale') unless
-- the caller still hosts the session, so a host that lost it never acknowledges the new
-- host's dispatch entry.
--
-- KEYS[1] shard dispatch, KEYS[2] shard delayed set, KEYS[3] shard dead-letter stream, then
--   2 keys per item: session meta, session lease
-- ARGV[1] worker id, ARGV[2] consumer group, ARGV[3] now (ms), then 6 args per item:
--   mode, session id, host epoch, dispatch entry id, a, b
-- Modes:
--   ack       the session ended (or was ended): acknowledge the entry, drop the lease
--   unload    idle: state idle, no outstanding dispatch, entry acknowledged -- unless the
--             session's seq moved past a (the host's read cursor): then 'busy', nothing done
--   retry     schedule attempt b at time a (ms) through the delayed set; entry acknowledged
--   handback  drain: bump the epoch (fences the old handler), re-dispatch and acknowledge
--   dead      dead-letter once (a = error JSON, b = agent); the entry stays pending until the
--             session's end is recorded and it is acknowledged with 'ack'
local dispatch, delayed, dead = KEYS[1], KEYS[2], KEYS[3]
local me, group, now = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 1, (#KEYS - 3) / 2 do
  local kmeta, klease = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local b0 = 3 + (i - 1) * 6
  local mode, sid, epoch, id = ARGV[b0 + 1], ARGV[b0 + 2], ARGV[b0 + 3], ARGV[b0 + 4]
  local a, b = ARGV[b0 + 5], ARGV[b0 + 6]
  local m = redis.call('HMGET', kmeta, L.META_EPOCH, L.META_SEQ, L.META_ATTEMPT, L.META_DEAD)
  if m[1] ~= epoch then
    out[i] = 'stale'
  elseif mode == 'unload' and tonumber(m[2] or '0') > tonumber(a) then
    out[i] = 'busy'
  elseif mode == 'dead' then
    if m[4] ~= '1' then
      ec_dead_session(dead, kmeta, sid, b, m[3] or '1', a, me, now, id)
    end
    out[i] = 'ok'
  else
    if redis.call('GET', klease) == me then redis.call('DEL', klease) end
    redis.call('XACK', dispatch, group, id)
    if mode == 'ack' then
      ec_set(kmeta, L.META_HOST, '')
      redis.call('HDEL', kmeta, L.META_DISPATCHED)
    elseif mode == 'unload' then
      ec_set(kmeta, L.META_STATE, L.STATE_IDLE, L.META_HOST, '')
      redis.call('HDEL', kmeta, L.META_DISPATCHED)
    elseif mode == 'retry' then
      redis.call('ZADD', delayed, a, sid)
      ec_set(kmeta, L.META_STATE, L.STATE_IDLE, L.META_HOST, '', L.META_ATTEMPT, b,
        L.META_DISPATCHED, '1')
    elseif mode == 'handback' then
      redis.call('HINCRBY', kmeta, L.META_EPOCH, 1)
      ec_dispatch(dispatch, sid, 'handback')
      ec_set(kmeta, L.META_STATE, L.STATE_IDLE, L.META_HOST, '', L.META_DISPATCHED, '1')
    end
    out[i] = 'ok'
  end
end
return out
