-- One job's record (conveyor::progress::record): the fields of one or
-- more progress messages of the job, written in one call.
-- KEYS[1] HASH  P:{Q}:job:<id>   the record
-- KEYS[2] ZSET  P:{Q}:records    ended records of the queue, by end (ms)
-- ARGV[1] job id
-- ARGV[2] JSON of the job's fields (field `job`)
-- ARGV[3] when the record is first written (field `created_at`, kept)
-- ARGV[4] when the job ended (ms), 0 while it lives
-- ARGV[5] TTL of the record (ms): the retention once ended, longer while it lives
-- ARGV[6] ended records the queue keeps at most
-- ARGV[7] the records' key prefix (`P:{Q}:job:`), to drop the oldest
-- ARGV[8] the retention (ms): older entries of KEYS[2] have expired
-- ARGV[9..] pairs: `stage:<index>`, JSON of the stage
local fields = {'job', ARGV[2]}
for i = 9, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
-- Only commands the daemon's ACL rule already grants (docs/operations.md).
if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then
  fields[#fields + 1] = 'created_at'
  fields[#fields + 1] = ARGV[3]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local ended = tonumber(ARGV[4])
if ended == 0 then
  -- Living again (a retry, a revival, the id enqueued anew): not ended.
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[2], ended, ARGV[1])
-- Entries whose record has expired.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (ended - tonumber(ARGV[8])))
-- The oldest ended records past the bound, a few per call (each call adds one).
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over <= 0 then
  return 0
end
if over > 64 then
  over = 64
end
local old = redis.call('ZRANGE', KEYS[2], 0, over - 1)
redis.call('ZREM', KEYS[2], unpack(old))
for _, id in ipairs(old) do
  -- Same hash tag as KEYS[1]: the same slot on a Cluster.
  redis.call('DEL', ARGV[7] .. id)
end
return #old
