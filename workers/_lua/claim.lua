-- Claim sessions for a worker: lease + host epoch bump + meta state, per dispatch entry; and
-- record the hosting's `session.started` in the same step (one append script call and round
-- trip less per session).
--
-- KEYS[1] shard dispatch stream, KEYS[2] shard dead-letter stream, KEYS[3] shard feed, then 4
--   keys per item: session meta, session lease, session stream, session dedupe
-- ARGV[1] worker id, ARGV[2] lease ttl (ms), ARGV[3] consumer group, ARGV[4] most deliveries
--   of one entry, ARGV[5] now (ms), ARGV[6] notify channel, ARGV[7] the tail of the
--   session.started body after the agent, ARGV[8] an evicted worker ('' for none: its
--   presence connection closed, see presence.lua), whose live leases do not hold the session
--   (the claim bumps the epoch: that dead host's writes are refused), then 3 args per item: dispatch entry id, session id,
--   the session.started body up to the agent (as the append script gets it: the envelope JSON
--   without seq and without its opening brace; its event key is 'session.started')
-- Returns one array per item:
--   {'ok', epoch, agent, attempt, dead, error, created_at, labels, seq, started, checkpoint}
--                        the caller now hosts it (seq: the session's last seq at the claim, read
--                        atomically with it, before session.started); started: the seq of
--                        session.started recorded now, -seq when an earlier hosting recorded
--                        it (event key dedupe, as an append would answer), 0 when not recorded
--                        here (dead, or anything unusual: the caller appends it itself and gets
--                        the append script's answer); dead = '1': the session is dead-lettered
--                        (by a previous host, or now: its entry was delivered more than ARGV[4]
--                        times -- each host died with it, a crash loop), and the caller only
--                        records its end; checkpoint: the seq of the handler's last
--                        session.checkpoint ('' when none)
--   {'held', holder}     another worker holds a live lease: the entry goes back to it, its
--                        delivery count as before (its host renews it, or it was reclaimed
--                        from a host that came back)
--   {'gone'}             the entry is no longer pending to this worker (another worker took
--                        it over while it waited here): nothing done
--   {'ended'} / {'missing'} / {'corrupt', text}   nothing to host: the entry is acknowledged
-- Commands per fresh session (created, never hosted): one HMGET of the meta hash (everything
-- the claim and session.started need), SET lease, the two XADDs, HSET dedupe, one HSET of the
-- meta hash, PUBLISH; per batch one TYPE and one XPENDING. The lease is looked up only once
-- the session has been hosted (epoch > 0), the dedupe map only past seq 1.
local dispatch, deadstream, feed, me, ttl, group = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2],
  ARGV[3]
local max_deliveries, now, notify, tail = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local evicted = ARGV[8]
local nitems = (#KEYS - 3) / 4
local ft = redis.call('TYPE', feed).ok
local feed_ok = ft == 'none' or ft == 'stream'
local STARTED = L.SESSION_STARTED

-- session.started as the append script records it (the prelude's entry writer; dedupe event
-- key -> seq; notify "<sid> <seq>"). m: the claim's HMGET of the meta hash. Returns the seq,
-- -seq of a duplicate, or 0 to leave it to the caller's append; with the meta fields to set
-- (seq, updated_at) when it recorded one, which the claim writes in its own HSET.
local function started(kstream, kdedupe, sid, head, m)
  local agent, seq0 = m[2] or '', tonumber(m[8])
  -- the agent is spliced into the body as is: only when JSON needs no escaping of it
  if not feed_ok or not seq0 or string.find(agent, '[^ -~]') or string.find(agent, '["\\]')
  then
    return 0
  end
  -- a stream holding only session.created (seq 1) has no session.started to dedupe to
  if seq0 > 1 then
    local d = redis.pcall('HGET', kdedupe, STARTED)
    if type(d) == 'table' and d.err then return 0 end
    if d then
      local first = tonumber(d)
      if first then return -first end
      return 0
    end
  end
  local sseq = tostring(seq0 + 1)
  local inc, gen = m[11] or '', m[12] or ''
  -- 'g' as the append script writes it once the session has a generation (a shard generation
  -- newer than the session's is adopted by the next append, not here)
  if gen ~= '' then gen = gen .. ':' .. (m[13] or '') end
  local x = ec_entry(kstream, feed, sid, sseq, inc, STARTED, ec_body(sseq, head .. agent .. tail),
    '', false, gen)
  if x.err then return 0 end
  redis.call('HSET', kdedupe, STARTED, sseq)
  ec_publish(notify, nil, sid, sseq, false)
  return seq0 + 1, {L.META_SEQ, sseq, L.META_UPDATED_AT, now}
end

-- This batch's entries still pending to this worker, with their delivery counts: one XPENDING
-- over the id range of the batch (exact unless it came back full: then unknown ids are looked
-- up one by one).
local function pending_counts()
  local lo, hi, lo_ms, lo_n, hi_ms, hi_n
  for i = 1, nitems do
    local id = ARGV[6 + 3 * i]
    local dash = string.find(id, '-', 1, true)
    local ms, n = tonumber(string.sub(id, 1, (dash or 0) - 1)), tonumber(dash and string.sub(id, dash + 1) or '0')
    if not ms or not n then return nil end
    if not lo or ms < lo_ms or (ms == lo_ms and n < lo_n) then lo, lo_ms, lo_n = id, ms, n end
    if not hi or ms > hi_ms or (ms == hi_ms and n > hi_n) then hi, hi_ms, hi_n = id, ms, n end
  end
  if not lo then return nil end
  local count = nitems + 64
  local p = redis.call('XPENDING', dispatch, group, lo, hi, count, me)
  local counts = {}
  for _, e in ipairs(p) do counts[e[1]] = e[4] end
  return counts, #p < count
end

local function claim(kmeta, klease, kstream, kdedupe, id, sid, head, counts, exact)
  local delivered = counts and counts[id]
  -- (looked at once: a repeat of the entry in this batch finds it gone)
  if counts then counts[id] = nil end
  if not delivered then
    if exact then return {'gone'} end
    local mine = redis.call('XPENDING', dispatch, group, id, id, 1, me)
    if #mine == 0 then return {'gone'} end
    delivered = mine[1][4]
  end
  local m = redis.pcall('HMGET', kmeta, L.META_STATE, L.META_AGENT, L.META_ATTEMPT,
    L.META_DEAD, L.META_ERROR, L.META_CREATED_AT, L.META_LABELS, L.META_SEQ, L.META_CHECKPOINT,
    L.META_EPOCH, L.META_INCARNATION, L.META_GENERATION, L.META_GENERATION_FROM)
  if m.err then
    redis.call('XACK', dispatch, group, id)
    return {'corrupt', m.err}
  end
  if not m[1] then
    redis.call('XACK', dispatch, group, id)
    return {'missing'}
  end
  if m[1] == L.STATE_ENDED then
    redis.call('XACK', dispatch, group, id)
    redis.call('HDEL', kmeta, L.META_DISPATCHED)
    return {'ended'}
  end
  -- epoch 0: never hosted (a claim or a handback bumps it), so nobody holds a lease on it
  local e0 = m[10]
  if e0 and e0 ~= '0' then
    local holder = redis.pcall('GET', klease)
    if type(holder) == 'table' and holder.err then
      redis.call('XACK', dispatch, group, id)
      return {'corrupt', holder.err}
    end
    if holder and holder ~= me and holder ~= evicted then
      -- not a delivery: XAUTOCLAIM took the entry (and counted it) while its host's lease
      -- still lives. Give it back to that host with the count it had, so the crash-loop limit
      -- counts only hostings that died; if the host is dead, its lease lapses and the entry is
      -- idle again one TTL later.
      redis.call('XCLAIM', dispatch, group, holder, 0, id, 'RETRYCOUNT',
        math.max(tonumber(delivered) - 1, 0), 'JUSTID')
      return {'held', holder}
    end
  end
  local epoch
  if e0 == nil or string.match(e0, '^%d+$') then
    epoch = (tonumber(e0) or 0) + 1
  else
    epoch = redis.call('HINCRBY', kmeta, L.META_EPOCH, 1)  -- (raises, as it always did)
  end
  redis.call('SET', klease, me, 'PX', ttl)
  local dead, err = m[4] or '', m[5] or ''
  if dead ~= '1' and tonumber(delivered) > max_deliveries then
    dead = '1'
    err = cjson.encode({type = 'CrashLoop', retryable = false, message =
      'dispatched ' .. delivered .. ' times without finishing: its hosts kept dying'})
    ec_dead_session(deadstream, kmeta, sid, m[2] or '', m[3] or '1', err, me, now, id)
  end
  local rec, set = 0, nil
  if dead ~= '1' then
    rec, set = started(kstream, kdedupe, sid, head, m)
  end
  -- the hosting (epoch, state, host) and what session.started moved (seq), in one HSET
  if set then
    ec_set(kmeta, L.META_EPOCH, epoch, L.META_STATE, L.STATE_ACTIVE, L.META_HOST, me,
      L.META_DISPATCHED, '1', set[1], set[2], set[3], set[4])
  else
    ec_set(kmeta, L.META_EPOCH, epoch, L.META_STATE, L.STATE_ACTIVE, L.META_HOST, me,
      L.META_DISPATCHED, '1')
  end
  return {'ok', epoch, m[2] or '', m[3] or '1', dead, err, m[6] or '', m[7] or '{}',
    m[8] or '0', rec, m[9] or ''}
end

local counts, exact = pending_counts()
local out = {}
for i = 1, nitems do
  local k, a = 4 * i, 6 + 3 * i
  out[i] = claim(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a], ARGV[a + 1],
    ARGV[a + 2], counts, exact)
end
ec_notify_flush(notify)
return out
