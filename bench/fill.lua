-- wrk script of bench/snapshot.sh and bench/restart.sh: writes keys
-- key:1..N (N the script's argument: wrk ... -s bench/fill.lua URL -- N),
-- each a 200-byte value with a one-hour ttl and one of 16 tags.
--
-- Two threads (-t2): thread 1 writes the odd keys, thread 2 the even ones,
-- round and round (wrk also calls request() once to probe it, so a first
-- key may be skipped the first time round) until the caller stops wrk.
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end
function init(args)
  items = assert(tonumber(args[1]), "fill.lua needs the item count: -- N")
  n = 0
  pad = string.rep("x", 200 - 2)
  headers = {["Content-Type"] = "application/json"}
end
request = function()
  local k = (id - 1 + n * 2) % items + 1
  n = n + 1
  local body = '{"value":"' .. pad .. '","ttl":3600,"tags":["t' .. (k % 16) .. '"]}'
  return wrk.format("PUT", "/api/v1/cache/key:" .. k, headers, body)
end
