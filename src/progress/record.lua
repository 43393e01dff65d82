-- The records of a queue's jobs (conveyor::progress::record): what one
-- pipeline of progress messages writes into them, every job of the queue
-- in one call.
-- KEYS[1]   ZSET  P:{Q}:records    ended records of the queue, by end (ms)
-- KEYS[2]   HASH  P:{Q}:leases     job id -> token of the current delivery
-- KEYS[3..] HASH  P:{Q}:job:<id>   one record per job of the call
-- ARGV[1] the records' key prefix (`P:{Q}:job:`), to drop the oldest
-- ARGV[2] ended records the queue keeps at most
-- ARGV[3] the retention (ms): an ended record's TTL; older entries of
--         KEYS[1] have expired
-- ARGV[4] a living record's TTL (ms)
-- ARGV[5..] per record, in KEYS order, a group:
--   id;
--   fence: which write goes through (a late message of an earlier delivery
--     must not undo what a later one wrote):
--     `t:<token>` a delivery's: while it holds the lease; once no delivery
--       does, when it wrote the record last (field `owner`), no delivery
--       did, or this is its first message;
--     `u` a job dropped as it was taken (cancelled): while no delivery
--       holds the lease;
--     `n` a message judged unrunnable: only a new record;
--   opens: 0, 1 the job waits again (requeued, handed over), 2 the
--     delivery's first message (started, or handed over at once): the
--     living TTL, out of the index of ended records;
--   ended (ms, 0 while it lives), created_at (kept once set), the `job`
--   field's JSON, n, then n pairs `stage:<index>`, JSON of the stage
-- Returns the number of ended records dropped past ARGV[2]; a write the
-- fence stops is left out silently.
-- Only commands the daemon's ACL rule already grants (docs/operations.md).
local retention = tonumber(ARGV[3])
local living = ARGV[4]
local last_end, ends = 0, 0

local function admits(key, id, fence, opens)
  if fence == 'n' then
    -- HEXISTS, not EXISTS: the worker's ACL rule grants the former.
    return redis.call('HEXISTS', key, 'job') == 0
  end
  local lease = redis.call('HGET', KEYS[2], id)
  if fence == 'u' then
    return not lease
  end
  local token = string.sub(fence, 3)
  if lease then
    return lease == token
  end
  if opens == '2' then
    return true
  end
  local owner = redis.call('HGET', key, 'owner')
  return not owner or owner == token
end

local function write(key, id, fields, opens, ended, created)
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
  elseif opens ~= '0' or new then
    redis.call('PEXPIRE', key, living)
    if opens ~= '0' and not new then
      -- Living again (a retry, a revival, the id enqueued anew): not ended.
      redis.call('ZREM', KEYS[1], id)
    end
  end
end

local at = 5
for k = 3, #KEYS do
  local key = KEYS[k]
  local id, fence, opens = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local ended, created = tonumber(ARGV[at + 3]), ARGV[at + 4]
  local n = tonumber(ARGV[at + 6])
  local first = at + 7
  at = first + 2 * n
  if admits(key, id, fence, opens) then
    local fields = {'job', ARGV[first - 2]}
    for i = first, at - 1 do
      fields[#fields + 1] = ARGV[i]
    end
    if string.sub(fence, 1, 2) == 't:' then
      fields[#fields + 1] = 'owner'
      fields[#fields + 1] = string.sub(fence, 3)
    end
    write(key, id, fields, opens, ended, created)
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
