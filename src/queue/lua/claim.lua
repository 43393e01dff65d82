-- Claims deliveries just taken into a daemon's active list, one or a batch
-- of one queue: records each delivery's fencing token and, when the daemon
-- gave the job its id, rewrites its entry in place.
--
-- KEYS[1]  LIST  the daemon's active list
-- KEYS[2]  HASH  leases: job id -> fencing token of the current delivery
-- KEYS[3]  HASH  crashes: job id -> times a daemon died running it
-- KEYS[4]  HASH  cancelled: job id -> when cancellation was asked (ms)
-- ARGV     4 per item: the entry as taken, the entry to keep (equal unless
--          rewritten), job id, fencing token ("<worker id>/<unique>")
--
-- Returns one code per item: the job's crash count (>= 0) when claimed.
-- Otherwise nothing is changed for that item and its code is:
--   -1  the entry is not in the active list
--   -2  another delivery of the same job id holds a lease (a duplicate of
--       a live job)
--   -3  the job was cancelled
-- Idempotent: an item retried after its reply was lost finds its own token
-- and answers as the first call did.
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
        -- In place, so the active list keeps the order jobs were taken in.
        redis.call('LSET', KEYS[1], pos, keep)
      end
      redis.call('HSET', KEYS[2], id, token)
      code = tonumber(redis.call('HGET', KEYS[3], id) or '0')
    end
  end
  out[#out + 1] = code
end
return out
