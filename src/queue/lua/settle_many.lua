-- settle.lua for a batch of deliveries of one queue and one source list:
-- the same checks and effects, item by item, in one call.
--
-- KEYS[1..4]  as settle.lua: source, leases, crashes, cancelled
-- KEYS[5]     pending   KEYS[6] dead   KEYS[7] scheduled
-- ARGV        6 per item: entry, job id, token, mode, entry to push,
--             delay ms; mode is "ack" (job over), "drop" (this delivery
--             only), "dead" (LPUSH dead), "requeue" (RPUSH pending),
--             "retry" (ZADD scheduled at Redis TIME + delay)
--
-- Returns 1 or 0 per item, as settle.lua.
local out = {}
local now_ms
for i = 1, #ARGV, 6 do
  local raw, id, token, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local entry, delay = ARGV[i + 4], ARGV[i + 5]
  local ok = 1
  if token ~= '' and redis.call('HGET', KEYS[2], id) ~= token then
    ok = 0
  elseif redis.call('LREM', KEYS[1], 1, raw) == 0 then
    ok = 0
  end
  if ok == 1 then
    if token ~= '' then
      redis.call('HDEL', KEYS[2], id)
    end
    if id ~= '' and (mode == 'ack' or mode == 'dead') then
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
    end
    if mode == 'dead' then
      redis.call('LPUSH', KEYS[6], entry)
    elseif mode == 'requeue' then
      redis.call('RPUSH', KEYS[5], entry)
    elseif mode == 'retry' then
      if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('ZADD', KEYS[7], now_ms + tonumber(delay), entry)
    end
  end
  out[#out + 1] = ok
end
return out
