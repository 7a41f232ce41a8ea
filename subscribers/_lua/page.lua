-- One catch-up page of a session stream, bounded in bytes as well as in entries, so what one
-- SSE client holds never depends on how large the session's events are.
--
-- KEYS[1] stream; ARGV[1] exclusive start ("(0-N"), ARGV[2] most entries, ARGV[3] most bytes
-- (field names and values; the first entry is always taken, whatever its size). A blob-backed
-- entry (field "r") is a page of its own: what it costs is only known once hydrated. Reads in
-- slices sized from what it has seen, so a page of large entries never makes Redis copy much
-- more than it returns.
--
-- Returns {complete, entries}: complete is 1 when the stream ended before either bound.
local key, start = KEYS[1], ARGV[1]
local count, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, used = {}, 0
local want = math.min(count, 16)
while true do
  local slice = redis.call('XRANGE', key, start, '+', 'COUNT', want)
  for _, entry in ipairs(slice) do
    local fields, size, blob = entry[2], 0, false
    for i = 1, #fields, 2 do
      size = size + #fields[i] + #fields[i + 1]
      if fields[i] == 'r' then blob = true end
    end
    if #out > 0 and (blob or used + size > budget) then return {0, out} end
    out[#out + 1] = entry
    used = used + size
    if blob or #out == count then return {0, out} end
    start = '(' .. entry[1]
  end
  if #slice < want then return {1, out} end
  local fit = math.floor((budget - used) * #out / used) + 1
  want = math.max(1, math.min(count - #out, fit, 256))
end
