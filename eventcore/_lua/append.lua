-- Append a batch of envelopes atomically: dedupe, seq, session stream + shard feed, metadata.
--
-- KEYS[1] shard feed, KEYS[2] shard dispatch, KEYS[3] this batch's token key, KEYS[4] the
--   shard's last issued incarnation, KEYS[5] the shard's epoch hash (write counter and
--   generation), then 6 keys per session in the batch: stream, meta, dedupe, signals,
--   effects, lease, then (last, optional) the shard's sessions index (zset: a created
--   session is added with its incarnation as score)
-- ARGV[1] event count, ARGV[2] now (ms), ARGV[3] notify channel, ARGV[4] wake channel,
--   ARGV[5] token ttl (s), ARGV[6] the highest write counter this writer has been answered for
--   the shard, ARGV[7] session count S, ARGV[8] '1' when the caller is a Redis Cluster client
--   (dispatch entries then ring the doorbell channel, see ec_dispatch), ARGV[9 .. 8+S] the
--   session ids, ARGV[9+S] the count T of the plain events' types and ARGV[10+S .. 9+S+T]
--   those types, then ARGV[10+S+T] the events' records, in batch order, then 6 args per full
--   event (in the records' order): session index (1-based), type, event key ('' when the
--   client generated it), body (the envelope JSON without seq and without its opening brace),
--   host epoch or '', extra.
--   A record is a newline, then two bytes, then for a plain event (generated key, no epoch,
--   extra '') its body: the bytes are its session index and its type's (1-based, < 256); both
--   are 0 for a full event, whose fields are its 6 args. The common event thus travels inside
--   one argument (JSON holds no raw newline): the server parses, allocates and converts one
--   argument per batch instead of three per event
-- extra is '' or flags NUL server_data-JSON NUL aux, where flags has 'r' when the payload is a
--   blob reference, and aux is for session.created a JSON {agent, labels, ttl, at}, for
--   signal/effect the signal/effect key, and for a host's session.ended (with its epoch)
--   'group NUL dispatch entry id NUL host': the hosting is released in the same step (entry
--   acknowledged, the host's lease dropped), as the worker's release script does on 'ack'.
-- A generated event key is already inside the body and nobody can retry with it except a resend
-- of this very batch, which the token catches: so generated keys skip the dedupe map, saving
-- its commands and memory. Caller-chosen keys are looked up with one HMGET per session.
-- The creation's and the end's own keys ('session.created' on session.created, 'session.ended'
--   on session.ended, as create_session/end_session send them) skip the map too: the session's
--   state answers for them (it exists: its creation is seq 1; it has ended: its end is its last
--   seq, nothing is appended after it), saving a lookup and a write per creation and per end.
--   Another event under one of those keys is a duplicate of that creation / end as before.
--
-- Returns one value per event, then the shard's write counter after the batch. Per event:
--   seq > 0 appended ({seq, incarnation} for a session.created that was appended); -seq
--   duplicate event key (the first seq); or a string 'code:value':
--   2 stale host epoch (value = current epoch), 3 no such session, 4 session ended (value =
--   last seq), 5 corrupt key or bad argument (value = error text).
-- Incarnations: a session id created again after it was deleted (or expired) is a new session.
--   Its creation gets a new incarnation, microseconds of the server's clock as 16 digits, kept
--   increasing per shard (KEYS[4]) so they order across clock steps: stored in the metadata
--   ('inc') and on every entry of the session, in its stream and on the feed ('inc'), which is
--   how subscribers and live streams tell the entries of a deleted session from those of its
--   successor under the same id.
-- Epochs (failover honesty): every batch that appends increments the shard's write counter,
--   and each writer remembers the highest value it was answered. A counter found below what
--   the writer was answered means the shard lost acknowledged writes (a replica promoted
--   without them, a restart without persistence): the shard gets a new generation (server
--   microseconds, increasing) before anything is appended. A session appended to while its
--   generation is older than the shard's takes the shard's, and records in 'genf' the lowest
--   tail any generation change found (what is known good below it); its entries from then on
--   carry 'g' = "<generation>:<genf>", so a reader that saw a seq above genf under an older
--   generation is told its history diverged instead of silently taking reused seqs.
-- The results are stored under the token key, so a resend of the same batch (after a reply was
-- lost to a dropped connection or a restart) returns them instead of appending twice.
local prev = redis.call('GET', KEYS[3])
if prev then
  -- a write, so a WAIT after this resend covers the first run's writes (replication is in
  -- order): a resend answered from here is acknowledged only once they are replicated
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  return cmsgpack.unpack(prev)
end

local n, now, nsess = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[7])
local feed, dispatch = KEYS[1], KEYS[2]
for _, k in ipairs({feed, dispatch}) do
  local t = redis.call('TYPE', k).ok
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE shard stream ' .. k .. ' holds a ' .. t)
  end
end
local E0 = 9 + nsess  -- the count of the plain events' types
local TYPES = {}
for j = 1, tonumber(ARGV[E0]) do TYPES[j] = ARGV[E0 + j] end
local R = E0 + #TYPES + 1  -- the records, then the full events' args
local ring = ARGV[8] == '1'
local CREATED, ENDED, CHECKPOINT = L.SESSION_CREATED, L.SESSION_ENDED,
  L.SESSION_CHECKPOINT

-- the shard's last issued incarnation: read (with the clock) at the batch's first creation,
-- stored once after the batch (KEYS[4])
local last_inc = nil
local function new_incarnation()
  local us
  if last_inc == nil then
    local t = redis.call('TIME')
    us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local last = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
    if us <= last then us = last + 1 end
  else
    us = last_inc + 1
  end
  last_inc = us
  return string.format('%016.0f', us)
end

local ep = redis.call('HMGET', KEYS[5], L.SHARD_WRITES, L.SHARD_GENERATION)
local writes = tonumber(ep[1]) or 0
local shard_gen = ep[2] or ''
local seen = tonumber(ARGV[6]) or 0
if writes < seen then
  -- the shard lost writes this writer had acknowledged: history may diverge from here
  local t = redis.call('TIME')
  local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(shard_gen) or 0
  if us <= last then us = last + 1 end
  shard_gen = string.format('%016.0f', us)
  writes = seen
  redis.call('HSET', KEYS[5], L.SHARD_GENERATION, shard_gen, L.SHARD_WRITES, writes)
end

local function typed(key, want)
  local t = redis.call('TYPE', key).ok
  return t == 'none' or t == want
end

-- the event keys that the session's state answers for, when the event is of that type
local STATE_KEYS = {[CREATED] = true, [ENDED] = true}

-- Pass 1: the caller-chosen event keys of each session, to look them all up in one HMGET
-- (plain events have none).
local wanted = {}
for a = R + 1, #ARGV, 6 do  -- the full events (plain ones have no key)
  local ek = ARGV[a + 2]
  if ek ~= '' and not (ek == ARGV[a + 1] and STATE_KEYS[ek]) then
    local sidx = tonumber(ARGV[a])
    local w = wanted[sidx]
    if w == nil then w = {}; wanted[sidx] = w end
    w[#w + 1] = ek
  end
end

local sessions = {}
local order = {}
local function load(sidx)
  local kb = 5 + (sidx - 1) * 6
  local m = {sid = ARGV[8 + sidx], kb = kb, kstream = KEYS[kb + 1]}
  sessions[sidx] = m
  order[#order + 1] = m
  local r = redis.pcall('HMGET', KEYS[kb + 2], L.META_SEQ, L.META_STATE, L.META_EPOCH,
                        L.META_DISPATCHED, L.META_TTL, L.META_INCARNATION,
                        L.META_GENERATION, L.META_GENERATION_FROM, L.META_HOST)
  if r.err then m.corrupt = r.err; return m end
  if (r[1] and not tonumber(r[1])) or (r[3] and not tonumber(r[3])) then
    m.corrupt = 'session metadata holds a non-numeric seq or epoch'
    return m
  end
  m.seq, m.state, m.epoch = tonumber(r[1]), r[2], tonumber(r[3]) or 0
  m.dispatched, m.ttl, m.inc = r[4], tonumber(r[5]), r[6] or ''
  m.gen, m.genf = r[7] or '', tonumber(r[8])
  m.hosted = (r[9] or '') ~= ''
  if m.seq ~= nil and shard_gen ~= '' and (tonumber(m.gen) or 0) < tonumber(shard_gen) then
    -- the shard changed generation since this session's last append: so does the session,
    -- known good up to its tail now (the lowest of every change)
    local genf = m.seq
    if m.genf ~= nil and m.genf < genf then genf = m.genf end
    m.gen, m.genf = shard_gen, genf
    m.set = {[L.META_GENERATION] = shard_gen, [L.META_GENERATION_FROM] = genf}
  end
  local w = wanted[sidx]
  if w ~= nil then
    m.seen = {}
    for j0 = 1, #w, 400 do  -- unpack() is bounded by the Lua C stack: look up in chunks
      local j1 = math.min(j0 + 399, #w)
      local d = redis.pcall('HMGET', KEYS[kb + 3], unpack(w, j0, j1))
      if d.err then m.corrupt = d.err; return m end
      for j = j0, j1 do
        if d[j - j0 + 1] then m.seen[w[j]] = tonumber(d[j - j0 + 1]) end
      end
    end
  end
  return m
end

-- Types with effects beyond the entry (metadata, dispatch, signal/effect maps): the slow path.
local SPECIAL = {[CREATED] = true, [ENDED] = true, [CHECKPOINT] = true, signal = true,
  effect = true, input = true}
-- A session takes the fast path while it exists, is sound and has not ended (recomputed after
-- every slow-path event, the only ones that change its state).
local function plain(m)
  m.plain = m.corrupt == nil and m.seq ~= nil and m.state ~= L.STATE_ENDED
end

local out = {}
-- a seq as text: '%d' (integer formatting) costs half of tostring's '%.14g' per event
local argv, byte, fmt, find, sub = ARGV, string.byte, string.format, string.find, string.sub
local records = argv[R]
local nrec = #records
local pos = 1  -- the next record's newline
local a = R + 1  -- the next full event's first arg
for i = 1, n do
  local h, typ, ek, body, epoch, extra
  local si, ti = byte(records, pos + 1, pos + 2)
  if si == 0 then  -- a full event
    h, typ, ek, body, epoch, extra = argv[a], argv[a + 1], argv[a + 2], argv[a + 3],
      argv[a + 4], argv[a + 5]
    a = a + 6
    pos = pos + 3
  else
    local q = find(records, '\n', pos + 3, true) or nrec + 1
    h, typ, ek, body, epoch, extra = si, TYPES[ti], '', sub(records, pos + 3, q - 1), '', ''
    pos = q
  end
  local m = sessions[h]  -- by the index as sent, then as a number
  if m == nil then
    local sidx = math.abs(tonumber(h))
    m = sessions[sidx] or load(sidx)
    sessions[h] = m
    plain(m)
  end
  if m.plain and ek == '' and extra == '' and not SPECIAL[typ]
      and (epoch == '' or tonumber(epoch) == m.epoch) then
    -- the common event: a generated key, no server data, no side effects
    local seq = m.seq + 1
    local sseq = fmt('%d', seq)
    local g = m.g  -- the entries' generation field, built once per session and batch
    if g == nil then
      g = ''
      if m.gen ~= '' then g = m.gen .. ':' .. (m.genf or '') end
      m.g = g
    end
    local x = ec_entry_plain(m.kstream, feed, m.sid, sseq, m.inc, typ, ec_body(sseq, body), g)
    if x then
      out[i] = '5:' .. x
      m.corrupt = x
      m.plain = false
    else
      m.seq = seq
      m.dirty = true
      if epoch == '' then m.outside = true end
      out[i] = seq
    end
  else
  local flags, sd, aux = '', '', ''
  if extra ~= '' then
    local p1 = string.find(extra, '\0', 1, true)
    local p2 = string.find(extra, '\0', p1 + 1, true)
    flags, sd, aux = string.sub(extra, 1, p1 - 1), string.sub(extra, p1 + 1, p2 - 1),
      string.sub(extra, p2 + 1)
  end
  local created = nil
  if typ == CREATED then
    local ok, c = pcall(cjson.decode, aux)
    if ok and type(c) == 'table' then created = c else created = false end
  end
  local dup = ek ~= '' and m.seen and m.seen[ek]
  if not dup and m.seq ~= nil and m.corrupt == nil then
    -- the state's keys (see the header); a duplicate's answer is the first one's seq
    if ek == CREATED and typ ~= CREATED then
      dup = 1
    elseif ek == ENDED and m.state == L.STATE_ENDED then
      dup = m.seq
    end
  end
  if m.corrupt ~= nil then
    out[i] = '5:' .. m.corrupt
  elseif dup then
    out[i] = -dup
  elseif typ == CREATED and m.seq ~= nil then
    out[i] = -1  -- the session exists: its creation is seq 1
  elseif m.seq == nil and typ ~= CREATED then
    out[i] = '3:'
  elseif m.state == L.STATE_ENDED then
    out[i] = '4:' .. m.seq
  elseif epoch ~= '' and tonumber(epoch) ~= m.epoch then
    out[i] = '2:' .. m.epoch
  elseif created == false then
    out[i] = '5:' .. CREATED .. ' needs its aux JSON'
  elseif (typ == 'signal' and not typed(KEYS[m.kb + 4], 'hash'))
      or (typ == 'effect' and not typed(KEYS[m.kb + 5], 'hash')) then
    out[i] = '5:WRONGTYPE signal/effect key of session ' .. m.sid .. ' is not a hash'
  else
    local kb = m.kb
    local seq = (m.seq or 0) + 1
    local sseq = fmt('%d', seq)
    local d = ec_body(sseq, body)
    local sid = m.sid
    local inc = m.inc
    local g = ''
    if created then
      inc = new_incarnation()
      m.gen, m.genf = shard_gen, nil  -- a new session starts on the shard's generation
      m.g = nil
    end
    if m.gen ~= '' then g = m.gen .. ':' .. (m.genf or '') end
    local x = ec_entry(KEYS[kb + 1], feed, sid, sseq, inc, typ, d, sd,
      extra ~= '' and string.find(flags, L.ENTRY_BLOB, 1, true) ~= nil, g)
    if x.err then
      out[i] = '5:' .. x.err
      m.corrupt = x.err
    else
      m.seq = seq
      m.dirty = true
      if epoch == '' then m.outside = true end
      if ek ~= '' and not (ek == typ and STATE_KEYS[ek]) then
        if m.seen == nil then m.seen = {} end
        m.seen[ek] = seq
        local nk = m.newkeys
        if nk == nil then nk = {}; m.newkeys = nk end
        nk[#nk + 1] = ek
        nk[#nk + 1] = seq
      end
      if created then
        local set = {}
        m.set = set
        m.state = L.STATE_CREATED
        m.hosted = false
        m.ttl = tonumber(created.ttl)
        m.inc = inc
        local agent = created.agent or ''
        set[L.META_STATE], set[L.META_AGENT] = L.STATE_CREATED, agent
        set[L.META_LABELS] = created.labels or '{}'
        set[L.META_CREATED_AT] = tonumber(created.at) or now
        set[L.META_TTL], set[L.META_EPOCH] = created.ttl or 0, 0
        set[L.META_INCARNATION] = inc
        local kindex = KEYS[6 + nsess * 6]
        if kindex then redis.call('ZADD', kindex, inc, sid) end
        if shard_gen ~= '' then set[L.META_GENERATION] = shard_gen end
        if agent ~= '' then
          ec_dispatch(dispatch, sid, 'created', ring)
          set[L.META_DISPATCHED] = '1'
          m.dispatched = '1'
        end
      elseif typ == ENDED then
        m.state = L.STATE_ENDED
        m.ended = true
        if m.set == nil then m.set = {} end
        m.set[L.META_STATE], m.set[L.META_ENDED_AT] = L.STATE_ENDED, now
        if aux ~= '' and epoch ~= '' then
          local q1 = string.find(aux, '\0', 1, true)
          local q2 = q1 and string.find(aux, '\0', q1 + 1, true)
          if q2 then
            local host = string.sub(aux, q2 + 1)
            redis.call('XACK', dispatch, string.sub(aux, 1, q1 - 1), string.sub(aux, q1 + 1, q2 - 1))
            if redis.call('GET', KEYS[kb + 6]) == host then redis.call('DEL', KEYS[kb + 6]) end
            redis.call('HDEL', KEYS[kb + 2], L.META_DISPATCHED)
            m.set[L.META_HOST] = ''
            m.hosted = false
          end
        end
      elseif typ == CHECKPOINT then
        if m.set == nil then m.set = {} end
        m.set[L.META_CHECKPOINT] = seq
      elseif typ == 'signal' then
        redis.call('HSET', KEYS[kb + 4], aux, d)
      elseif typ == 'effect' then
        -- overwriting the field also releases the caller's claim on the key
        redis.call('HSET', KEYS[kb + 5], aux, d)
      elseif typ == 'input' and m.state == L.STATE_IDLE and m.dispatched ~= '1' then
        ec_dispatch(dispatch, sid, 'input', ring)
        if m.set == nil then m.set = {} end
        m.set[L.META_DISPATCHED] = '1'
        m.dispatched = '1'
      end
      if created then out[i] = {seq, inc} else out[i] = seq end
    end
  end
  plain(m)
  end
end

local any = false
for _, m in ipairs(order) do
  if m.dirty then
    any = true
    local kb = m.kb
    if m.set == nil then
      ec_set(KEYS[kb + 2], L.META_SEQ, m.seq, L.META_UPDATED_AT, now)
    else
      local hs = {L.META_SEQ, m.seq, L.META_UPDATED_AT, now}
      for f, v in pairs(m.set) do hs[#hs + 1] = f; hs[#hs + 1] = v end
      ec_set(KEYS[kb + 2], unpack(hs))
    end
    local nk = m.newkeys
    if nk ~= nil then
      -- unpack() is bounded by the Lua C stack: write the dedupe entries in chunks
      for j = 1, #nk, 400 do
        redis.call('HSET', KEYS[kb + 3], unpack(nk, j, math.min(j + 399, #nk)))
      end
    end
    -- wake only while a host holds the session: one that claims it later reads its stream
    -- in the claim's own step, so it misses nothing appended before (a created session has
    -- no host yet)
    ec_publish(ARGV[3], ARGV[4], m.sid, m.seq, m.outside and m.hosted)
    if m.ended and m.ttl and m.ttl > 0 then
      for j = 1, 5 do redis.call('EXPIRE', KEYS[kb + j], m.ttl) end
    end
  end
end
ec_notify_flush(ARGV[3])
-- written even when nothing was appended (all duplicates): a WAIT after it then covers the
-- writes of the first copies too
if last_inc ~= nil then redis.call('SET', KEYS[4], string.format('%016.0f', last_inc)) end
if any then writes = writes + 1 end
redis.call('HSET', KEYS[5], L.SHARD_WRITES, writes)
out[n + 1] = writes
if any then redis.call('SET', KEYS[3], cmsgpack.pack(out), 'EX', ARGV[5]) end
return out
