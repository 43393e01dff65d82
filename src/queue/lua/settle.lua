-- Settles one delivery, atomically: removes the entry from the list that
-- holds it (a daemon's active list, or the dead list for `dead retry`) and
-- pushes what comes next.
--
-- KEYS[1]  LIST  source (active list, or dead list)
-- KEYS[2]  HASH  leases: job id -> fencing token
-- KEYS[3]  HASH  crashes: job id -> times a daemon died running it
-- KEYS[4]  HASH  cancelled: job id -> when cancellation was asked
-- KEYS[5]  LIST or ZSET  destination (ignored for "ack")
-- ARGV[1]  the entry to remove from KEYS[1]
-- ARGV[2]  job id, or "" when unknown (an unparsable message)
-- ARGV[3]  fencing token the caller holds, or "" for a delivery that was
--          never claimed (poison, duplicate, cancelled before it ran)
-- ARGV[4]  "ack"  remove only (completed, cancelled, duplicate)
--          "L"    LPUSH ARGV[5] (dead list, newest first; pending, back)
--          "R"    RPUSH ARGV[5] (pending, consuming end: taken next)
--          "Z"    ZADD ARGV[5] with score = Redis TIME in ms + ARGV[6]
-- ARGV[5]  the entry to push
-- ARGV[6]  delay in ms (for "Z")
-- ARGV[7]  "1" when the job's story ends here (completed, failed,
--          cancelled): forget its crash count and cancellation
--
-- Returns 1 when settled; 0 when the caller's lease is no longer current
-- (the job was recovered and handed to someone else) or the entry is gone.
-- Then nothing is changed, so a late daemon can never ack, requeue or
-- duplicate a job it lost.
local id, token = ARGV[2], ARGV[3]
if token ~= '' and redis.call('HGET', KEYS[2], id) ~= token then
  return 0
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
if token ~= '' then
  redis.call('HDEL', KEYS[2], id)
end
if id ~= '' and ARGV[7] == '1' then
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
local mode = ARGV[4]
if mode == 'L' then
  redis.call('LPUSH', KEYS[5], ARGV[5])
elseif mode == 'R' then
  redis.call('RPUSH', KEYS[5], ARGV[5])
elseif mode == 'Z' then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[6]), ARGV[5])
end
return 1
