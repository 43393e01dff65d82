-- claim.lua for a batch of deliveries of one queue and one daemon: the
-- same checks and effects, item by item, in one call.
--
-- KEYS  as claim.lua: active list, leases, crashes, cancelled
-- ARGV  4 per item: entry as taken, entry to keep, job id, token
--
-- Returns one code per item, as claim.lua.
local out = {}
for i = 1, #ARGV, 4 do
  local raw, keep, id, token = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local code
  local held = redis.call('HGET', KEYS[2], id)
  if held == token then
    code = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  else
    local pos = redis.call('LPOS', KEYS[1], raw)
    if not pos then
      code = -1
    elseif held then
      code = -2
    elseif redis.call('HEXISTS', KEYS[4], id) == 1 then
      code = -3
    else
      if keep ~= raw then
        redis.call('LSET', KEYS[1], pos, keep)
      end
      redis.call('HSET', KEYS[2], id, token)
      code = tonumber(redis.call('HGET', KEYS[3], id) or '0')
    end
  end
  out[#out + 1] = code
end
return out
