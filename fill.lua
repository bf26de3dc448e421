local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end
function init(args)
  n = 0
  pad = string.rep("x", 200 - 2)
  headers = {["Content-Type"] = "application/json"}
end
request = function()
  local k = id + n * 2
  n = n + 1
  if k > 20000 then return wrk.format("GET", "/api/v1/stats") end
  local body = '{"value":"' .. pad .. '","ttl":3600,"tags":["t' .. (k % 16) .. '"]}'
  return wrk.format("PUT", "/api/v1/cache/key:" .. k, headers, body)
end
