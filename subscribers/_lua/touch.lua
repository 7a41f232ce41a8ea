-- Keep entries a consumer is still working on (or waiting to retry) from looking idle, without
-- counting a delivery: XCLAIM JUSTID to itself, only for entries it still owns (one a reclaimer
-- already took stays taken).
--
-- KEYS[1] feed; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Returns how many it kept.
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if p[1] then args[#args + 1] = ARGV[i] end
end
if #args == 4 then return 0 end
args[#args + 1] = 'JUSTID'
redis.call('XCLAIM', unpack(args))
return #args - 5
