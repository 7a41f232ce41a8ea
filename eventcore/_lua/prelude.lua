-- The shared prelude of the scripts that write session entries or session state (joined in
-- front of each by eventcore._scripts.lua, after the table L of the layout's field names,
-- which come from eventcore/_layout.py). The one writer, on the Lua side, of:
--   session-stream entries and their feed entries (ec_entry, ec_feed_entry, ec_body),
--   dispatch entries (ec_dispatch), session state in the meta hash (ec_set),
--   worker dead letters (ec_dead_session) and the live notification (ec_publish).
local EC_T, EC_D, EC_SD, EC_R, EC_INC = L.ENTRY_TYPE, L.ENTRY_BODY, L.ENTRY_SERVER_DATA,
  L.ENTRY_BLOB, L.ENTRY_INCARNATION
local EC_SID, EC_SEQ = L.FEED_SESSION, L.FEED_SEQ

-- The entry's envelope JSON: seq first, then the body (the envelope JSON without seq and
-- without its opening brace, as encoded by the appender).
local function ec_body(sseq, body)
  return '{"seq":' .. sseq .. ',' .. body
end

-- The feed entry of an envelope (session.deleted has only this one). inc '' = none (a session
-- created before incarnations); sd '' = no server_data.
local function ec_feed_entry(feed, sid, sseq, inc, typ, d, sd, blob)
  if sd == '' and not blob then
    if inc == '' then
      return redis.call('XADD', feed, '*', EC_SID, sid, EC_SEQ, sseq, EC_T, typ, EC_D, d)
    end
    return redis.call('XADD', feed, '*', EC_SID, sid, EC_SEQ, sseq, EC_INC, inc, EC_T, typ,
      EC_D, d)
  end
  local f = {EC_SID, sid, EC_SEQ, sseq}
  if inc ~= '' then f[#f + 1] = EC_INC; f[#f + 1] = inc end
  f[#f + 1] = EC_T; f[#f + 1] = typ; f[#f + 1] = EC_D; f[#f + 1] = d
  if sd ~= '' then f[#f + 1] = EC_SD; f[#f + 1] = sd end
  if blob then f[#f + 1] = EC_R; f[#f + 1] = '1' end
  return redis.call('XADD', feed, '*', unpack(f))
end

-- An envelope at seq sseq: its session-stream entry (id 0-<seq>) and then its feed entry.
-- Returns the stream XADD's reply: a table with .err when the stream refused it (nothing
-- written then). gen (optional, the append script's): the session-stream entry's generation
-- field "<generation>:<good up to>" once the session's epoch has a generation (not on the feed).
local function ec_entry(kstream, feed, sid, sseq, inc, typ, d, sd, blob, gen)
  local x
  if gen == '' then gen = nil end
  if sd == '' and not blob and gen == nil then
    if inc == '' then
      x = redis.pcall('XADD', kstream, '0-' .. sseq, EC_T, typ, EC_D, d)
    else
      x = redis.pcall('XADD', kstream, '0-' .. sseq, EC_INC, inc, EC_T, typ, EC_D, d)
    end
  else
    local f = {}
    if inc ~= '' then f[1] = EC_INC; f[2] = inc end
    f[#f + 1] = EC_T; f[#f + 1] = typ; f[#f + 1] = EC_D; f[#f + 1] = d
    if sd ~= '' then f[#f + 1] = EC_SD; f[#f + 1] = sd end
    if blob then f[#f + 1] = EC_R; f[#f + 1] = '1' end
    if gen ~= nil then f[#f + 1] = L.ENTRY_GENERATION; f[#f + 1] = gen end
    x = redis.pcall('XADD', kstream, '0-' .. sseq, unpack(f))
  end
  if type(x) == 'table' and x.err then return x end
  ec_feed_entry(feed, sid, sseq, inc, typ, d, sd, blob)
  return x
end

-- ec_entry for the common event (no server_data, no blob): returns the stream's error text when
-- it refused the entry (nothing written then), nil when both entries were written.
local function ec_entry_plain(kstream, feed, sid, sseq, inc, typ, d, gen)
  if gen ~= '' then
    local x = ec_entry(kstream, feed, sid, sseq, inc, typ, d, '', false, gen)
    if type(x) == 'table' then return x.err end
    return nil
  end
  local x
  if inc == '' then
    x = redis.pcall('XADD', kstream, '0-' .. sseq, EC_T, typ, EC_D, d)
    if type(x) == 'table' then return x.err end
    redis.call('XADD', feed, '*', EC_SID, sid, EC_SEQ, sseq, EC_T, typ, EC_D, d)
  else
    x = redis.pcall('XADD', kstream, '0-' .. sseq, EC_INC, inc, EC_T, typ, EC_D, d)
    if type(x) == 'table' then return x.err end
    redis.call('XADD', feed, '*', EC_SID, sid, EC_SEQ, sseq, EC_INC, inc, EC_T, typ, EC_D, d)
  end
  return nil
end

-- EC_PUBLISH is PUBLISH, and SPUBLISH in the scripts of a Redis Cluster 7+ client
-- (eventcore._scripts.sharded: sharded pub/sub, delivered on the node serving the channel's
-- slot, the shard's, not to all nodes).
local EC_PUBLISH = 'PUBLISH'

-- A "host this session" job on the shard's dispatch stream, and "<sid>" published on the
-- channel named as the stream (Keys.dispatched): the doorbell of the workers' reads on Redis
-- Cluster, which cannot block on many shards at once (eventcore._doorbell). Every dispatch
-- entry is written here, so every one rings it, unless ring is false: the append script's
-- caller is no Redis Cluster client, and only a cluster client's groups listen to the
-- channel (a single node's readers block on XREADGROUP).
local function ec_dispatch(dispatch, sid, reason, ring)
  local id = redis.call('XADD', dispatch, '*', L.DISPATCH_SESSION, sid, L.DISPATCH_REASON, reason)
  if ring ~= false then redis.call(EC_PUBLISH, dispatch, sid) end
  return id
end

-- Session state and metadata: HSET of field/value pairs (field names from L.META_*).
local function ec_set(kmeta, ...)
  return redis.call('HSET', kmeta, ...)
end

-- The live notification after appends: "<sid> <last seq>" on notify, and on wake too when
-- they were made without a host epoch (what a host must react to). The notify notes of one
-- script call go out as one message, one note a line (ec_notify_flush, at the script's end:
-- one PUBLISH per call instead of one per session; a session id has no space or newline).
local EC_NOTES = {}
local function ec_publish(notify, wake, sid, sseq, outside)
  local note = sid .. ' ' .. sseq
  EC_NOTES[#EC_NOTES + 1] = note
  if outside then redis.call(EC_PUBLISH, wake, note) end
end

-- Publishes the notes ec_publish gathered (if any) on notify, as one message.
local function ec_notify_flush(notify)
  if #EC_NOTES > 0 then
    redis.call(EC_PUBLISH, notify, table.concat(EC_NOTES, '\n'))
    EC_NOTES = {}
  end
end

-- A worker's dead letter of a session (kind session), and the session marked dead with the
-- error so a later host only records its end.
local function ec_dead_session(dead, kmeta, sid, agent, attempts, err, worker, at, entry)
  redis.call('XADD', dead, '*', L.DEAD_KIND, L.DEAD_KIND_SESSION, L.DEAD_SESSION, sid,
    L.DEAD_AGENT, agent, L.DEAD_ATTEMPTS, attempts, L.DEAD_ERROR, err, L.DEAD_WORKER, worker,
    L.DEAD_AT, at, L.DEAD_ENTRY, entry)
  ec_set(kmeta, L.META_DEAD, '1', L.META_ERROR, err)
end

-- A consumer group's dead letter of a feed entry (kind subscriber): the entry's own fields
-- under f.<name>; the shape eventcore._codec.subscriber_dead_letter writes from Python.
local function ec_dead_entry(dead, group, consumer, feed, id, deliveries, err, kind, fields)
  local f = {L.DEAD_KIND, kind, L.DEAD_GROUP, group, L.DEAD_CONSUMER, consumer, L.DEAD_FEED,
             feed, L.DEAD_ENTRY, id, L.DEAD_DELIVERIES, deliveries, L.DEAD_ERROR, err}
  for i = 1, #fields, 2 do
    f[#f + 1] = L.DEAD_FIELD_PREFIX .. fields[i]
    f[#f + 1] = fields[i + 1]
  end
  redis.call('XADD', dead, '*', unpack(f))
end
