-- The records of a queue's jobs (conveyor::progress::record): what one
-- pipeline of progress messages writes into them, every job of the queue
-- in one call.
-- KEYS[1]   ZSET  P:{Q}:records    ended records of the queue, by end (ms)
-- KEYS[2..] HASH  P:{Q}:job:<id>   one record per job of the call
-- ARGV[1] the records' key prefix (`P:{Q}:job:`), to drop the oldest
-- ARGV[2] ended records the queue keeps at most
-- ARGV[3] the retention (ms): an ended record's TTL; older entries of
--         KEYS[1] have expired
-- ARGV[4] a living record's TTL (ms)
-- ARGV[5..] per record, in KEYS order, a group:
--   id, opens (1: the job starts or waits again, 0: not), ended (ms, 0
--   while it lives), created_at (kept once set), the `job` field's JSON,
--   n, then n pairs `stage:<index>`, JSON of the stage
-- Returns the number of ended records dropped past ARGV[2].
-- Only commands the daemon's ACL rule already grants (docs/operations.md).
local retention = tonumber(ARGV[3])
local living = ARGV[4]
local last_end, ends = 0, 0
local at = 5
for k = 2, #KEYS do
  local key = KEYS[k]
  local id, opens, ended, created = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + 3]
  local n = tonumber(ARGV[at + 5])
  local fields = {'job', ARGV[at + 4]}
  for i = at + 6, at + 5 + 2 * n do
    fields[#fields + 1] = ARGV[i]
  end
  at = at + 6 + 2 * n
  -- Every field written is new only when the record is: `job` is in
  -- every record.
  local new = redis.call('HSET', key, unpack(fields)) == #fields / 2
  if new then
    redis.call('HSET', key, 'created_at', created)
  end
  if ended > 0 then
    redis.call('PEXPIRE', key, retention)
    redis.call('ZADD', KEYS[1], ended, id)
    ends = ends + 1
    if ended > last_end then
      last_end = ended
    end
  elseif opens == '1' or new then
    redis.call('PEXPIRE', key, living)
    if opens == '1' and not new then
      -- Living again (a retry, a revival, the id enqueued anew): not ended.
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
if last_end == 0 then
  return 0
end
-- Entries whose record has expired.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (last_end - retention))
-- The oldest ended records past the bound: at most 64 more than this
-- call ended, so that a lower bound converges over calls while one call's
-- work stays bounded.
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if over <= 0 then
  return 0
end
if over > ends + 64 then
  over = ends + 64
end
local old = redis.call('ZRANGE', KEYS[1], 0, over - 1)
redis.call('ZREM', KEYS[1], unpack(old))
for _, id in ipairs(old) do
  -- Same hash tag as KEYS[1]: the same slot on a Cluster.
  redis.call('DEL', ARGV[1] .. id)
end
return #old
