-- Keep entries a consumer is still working on (or waiting to retry) from looking idle, without
-- counting a delivery: XCLAIM JUSTID to itself, only for entries it still owns (one a reclaimer
-- already took stays taken). With ARGV[3] = '1' it also takes back one delivery of each (the
-- one an XAUTOCLAIM counted when it took an entry whose consumer turned out to be alive).
--
-- KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] '1' to uncount, ARGV[4..] entry
-- ids. Returns how many it kept.
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local args, kept = {stream, group, me, 0}, 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1, me)
  if p[1] then
    kept = kept + 1
    if ARGV[3] == '1' then
      redis.call('XCLAIM', stream, group, me, 0, ARGV[i], 'RETRYCOUNT',
        math.max(tonumber(p[1][4]) - 1, 0), 'JUSTID')
    else
      args[#args + 1] = ARGV[i]
    end
  end
end
if #args > 4 then
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return kept
