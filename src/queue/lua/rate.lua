-- A start of a rate-limited job type: at most ARGV[1] starts in any window
-- of ARGV[2] ms, across all daemons (a sliding log of start times, by
-- Redis' clock).
--
-- KEYS[1]  ZSET  P:rate:<type>: member = a delivery's token, score = when
--                it started (Unix ms)
-- ARGV[1]  starts allowed per window   ARGV[2] window (ms)
-- ARGV[3]  this delivery's token
--
-- Returns 0 when the start is allowed (and recorded); otherwise the ms to
-- wait before the oldest start in the window leaves it. Idempotent: a
-- token already recorded is allowed again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window + 1000)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now + 1)
