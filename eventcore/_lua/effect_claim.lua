-- Claim an effect key, or report what the ledger already holds.
-- KEYS[1] effects hash, KEYS[2] session meta
-- ARGV[1] effect key, ARGV[2] claim token, ARGV[3] claim ttl (ms), ARGV[4] host epoch or ''
-- Returns {verdict, value}:
--   {'done', record}     a recorded result, or a terminal failure
--   {'wait', ms_left}    another caller holds a live claim (a claim made by an earlier host
--                        epoch than the caller's does not hold: that host was superseded --
--                        its process died and the session was taken over -- and what it
--                        would record is refused, so the caller takes the claim at once)
--   {'run', attempt}     the caller now holds the claim and must run fn
--   {'stale', epoch} / {'missing', ''} / {'ended', ''} / {'corrupt', why}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local meta = redis.call('HMGET', KEYS[2], L.META_SEQ, L.META_STATE, L.META_EPOCH)
if not meta[1] then return {'missing', ''} end
local attempt = 1
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  if string.sub(v, 1, 1) == '{' then
    local ok, rec = pcall(cjson.decode, v)
    if not ok or type(rec) ~= 'table' then
      return {'corrupt', 'the ledger entry is not an effect envelope'}
    end
    -- a large result lives in a blob (the caller hydrates it); only results get that large
    if type(rec.payload_ref) == 'string' then return {'done', v} end
    if type(rec.payload) ~= 'table' then
      return {'corrupt', 'the ledger entry is not an effect envelope'}
    end
    local p = rec.payload
    -- ErrorInfo omits retryable when it is true (its default)
    if p.status == 'ok' or not (type(p.error) == 'table' and p.error.retryable ~= false) then
      return {'done', v}
    end
    attempt = (tonumber(p.attempt) or 1) + 1
  else
    local token, n = string.match(v, '^claim:([^:]*):(%d+):')
    attempt = tonumber(n) or 1
    local expires = tonumber(string.match(v, ':(%d+)$')) or 0
    local by = tonumber(string.match(v, ':e(%d+):%d+$'))
    local superseded = by and ARGV[4] ~= '' and tonumber(ARGV[4]) > by
    -- the caller's own claim: its first call ran but the reply was lost (dropped connection,
    -- restart) and the client resent it; waiting for it would wait for ourselves
    if expires > now and token ~= ARGV[2] and not superseded then
      return {'wait', expires - now}
    end
  end
end
if meta[2] == L.STATE_ENDED then return {'ended', ''} end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= (tonumber(meta[3]) or 0) then
  return {'stale', meta[3] or '0'}
end
-- claim:<token>:<attempt>[:e<host epoch>]:<expires ms>
local by = ''
if ARGV[4] ~= '' then by = ':e' .. ARGV[4] end
redis.call('HSET', KEYS[1], ARGV[1],
  'claim:' .. ARGV[2] .. ':' .. attempt .. by .. ':' .. (now + tonumber(ARGV[3])))
return {'run', attempt}
