-- Enqueues one job, now or later, unless a job with the same id is live.
--
-- KEYS[1]  LIST  pending
-- KEYS[2]  ZSET  scheduled (score = due time, Unix ms)
-- KEYS[3]  HASH  leases: job id -> fencing token (a running job)
-- KEYS[4]  HASH  unique: job id -> "<state> <due ms> <enqueued ms> <type>" for jobs
--                enqueued through conveyor and not finished yet
-- ARGV[1]  job id ("" = no uniqueness check)
-- ARGV[2]  the job's JSON
-- ARGV[3]  when: "now" | "delay" (ARGV[4] ms after Redis TIME) |
--          "at" (ARGV[4] = due Unix ms)
-- ARGV[4]  milliseconds (see ARGV[3])
-- ARGV[5]  job type (kept in the unique entry, for `conveyor job`)
--
-- KEYS[5]  HASH  cancelled: job id -> when cancellation was asked; a new
--                job with the id clears a cancel flag left from before
--
-- For a periodic job's tick, also:
-- KEYS[6]  HASH  schedules: schedule name -> last tick enqueued (Unix ms)
-- ARGV[6]  schedule name   ARGV[7]  this tick (Unix ms)
-- A tick not after the last one is refused ({0, "fired", 0}): each tick is
-- enqueued once however many daemons run the schedule, and never again.
--
-- Returns {added (1 or 0), state, due ms}: when 0, nothing changed and
-- state is the live job's ("running", "pending", "scheduled").
if KEYS[6] then
  local last = tonumber(redis.call('HGET', KEYS[6], ARGV[6]) or '0')
  if tonumber(ARGV[7]) <= last then
    return {0, 'fired', 0}
  end
  redis.call('HSET', KEYS[6], ARGV[6], ARGV[7])
end
local id = ARGV[1]
if id ~= '' then
  if redis.call('HEXISTS', KEYS[3], id) == 1 then
    return {0, 'running', 0}
  end
  local live = redis.call('HGET', KEYS[4], id)
  if live then
    local state, due = string.match(live, '^(%S+) (%d+)')
    return {0, state or 'pending', tonumber(due or '0')}
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = 0
local state = 'pending'
if ARGV[3] == 'now' then
  redis.call('LPUSH', KEYS[1], ARGV[2])
else
  if ARGV[3] == 'delay' then
    due = now_ms + tonumber(ARGV[4])
  else
    due = tonumber(ARGV[4])
  end
  state = 'scheduled'
  redis.call('ZADD', KEYS[2], string.format('%.0f', due), ARGV[2])
end
if id ~= '' then
  -- Not live, so a cancel flag for this id is left from an earlier job
  -- (asked after it had finished): it must not drop this one. (A raw-pushed
  -- copy of the id still waiting in pending loses its cancel too: ids are
  -- unique only among jobs enqueued through this script.)
  redis.call('HDEL', KEYS[5], id)
  local entry = string.format('%s %.0f %.0f %s', state, due, now_ms, ARGV[5])
  redis.call('HSET', KEYS[4], id, entry)
end
return {1, state, due}
