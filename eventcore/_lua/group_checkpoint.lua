-- Raise a group's checkpoint (a feed entry id) and never lower it.
-- KEYS[1] checkpoint; ARGV[1] entry id. Returns 1 if it moved.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local a, b = parse(cur)
  local c, d = parse(ARGV[1])
  if a and (a > c or (a == c and b >= d)) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
