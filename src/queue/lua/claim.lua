-- Claims a job just taken into a daemon's active list: records the fencing
-- token of this delivery and, when the job got an id from the daemon,
-- rewrites its entry in place.
--
-- KEYS[1]  LIST  the daemon's active list
-- KEYS[2]  HASH  leases: job id -> fencing token of the current delivery
-- KEYS[3]  HASH  crashes: job id -> times a daemon died running it
-- KEYS[4]  HASH  cancelled: job id -> when cancellation was asked (ms)
-- ARGV[1]  the entry as taken
-- ARGV[2]  the entry to keep (equal to ARGV[1] unless rewritten)
-- ARGV[3]  job id
-- ARGV[4]  fencing token ("<worker id>/<unique>")
--
-- Returns the job's crash count (>= 0) when claimed. Otherwise nothing is
-- changed and it returns:
--   -1  the entry is not in the active list
--   -2  another delivery of the same job id holds a lease (a duplicate of
--       a live job)
--   -3  the job was cancelled
-- Idempotent: a call retried after its reply was lost finds its own token
-- and answers as the first call did.
local held = redis.call('HGET', KEYS[2], ARGV[3])
if held == ARGV[4] then
  return tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
end
local pos = redis.call('LPOS', KEYS[1], ARGV[1])
if not pos then
  return -1
end
if held then
  return -2
end
if redis.call('HEXISTS', KEYS[4], ARGV[3]) == 1 then
  return -3
end
if ARGV[2] ~= ARGV[1] then
  -- In place, so the active list keeps the order jobs were taken in.
  redis.call('LSET', KEYS[1], pos, ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
