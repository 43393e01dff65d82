-- Settles deliveries, one or a batch of one queue and one source list:
-- removes each entry from the list that holds it (a daemon's active list,
-- or the dead list when reviving) and pushes what comes next.
--
-- KEYS[1]  LIST  source (active list, or dead list)
-- KEYS[2]  HASH  leases: job id -> fencing token
-- KEYS[3]  HASH  crashes: job id -> times a daemon died running it
-- KEYS[4]  HASH  cancelled: job id -> when cancellation was asked
-- KEYS[5]  LIST  pending   KEYS[6] LIST dead   KEYS[7] ZSET scheduled
-- KEYS[8]  HASH  unique: job id -> state of a job enqueued through conveyor
-- KEYS[9]  LIST  a stage pool's list `P:{Q}:pool:<name>` (only for
--          "handover" and "return"; a call with such an item and no
--          KEYS[9] is refused before anything changes)
-- ARGV     6 per item:
--   entry to remove; job id ("" when unknown: an unparsable message);
--   fencing token ("" for a delivery never claimed: poison, duplicate,
--   cancelled before it ran, revival);
--   mode: "ack"     the job is over (completed, cancelled)
--         "drop"    this delivery only (a duplicate of a live job)
--         "dead"    LPUSH the entry to push onto dead
--         "requeue" RPUSH it onto pending (consuming end: taken next)
--         "retry"   ZADD it to scheduled at Redis TIME (ms) + delay
--         "revive"  LPUSH it onto pending, the job's history forgotten
--         "handover" LPUSH it onto the pool list KEYS[9], the end away
--                   from the consuming one: pool lists are FIFO, the job
--                   handed over first is taken first (its next stage runs
--                   in that pool; no attempt, requeue or crash counted)
--         "return"  RPUSH it onto the pool list KEYS[9], the consuming
--                   end: an entry taken from that list and not run (the
--                   daemon stops) goes back where it was, taken next
--   entry to push; delay in ms (for "retry")
--
-- Returns 1 or 0 per item. 0: the token is no longer the job's lease (the
-- job was recovered and handed to someone else) or the entry is gone; then
-- nothing is changed for that item, so a late daemon can never ack,
-- requeue or duplicate a job it lost. "ack", "dead" and "revive" end the
-- job's story here: its crash count and cancellation are forgotten, and
-- its id is free to enqueue again ("revive" makes it live, so taken).
for i = 4, #ARGV, 6 do
  if (ARGV[i] == 'handover' or ARGV[i] == 'return') and not KEYS[9] then
    return redis.error_reply('settle.lua: "' .. ARGV[i] .. '" needs the pool list as KEYS[9]')
  end
end
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
    if id ~= '' and (mode == 'ack' or mode == 'dead' or mode == 'revive') then
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
      if mode == 'revive' then
        redis.call('HSET', KEYS[8], id, 'pending 0 0 ')
      else
        redis.call('HDEL', KEYS[8], id)
      end
    end
    if mode == 'dead' then
      redis.call('LPUSH', KEYS[6], entry)
    elseif mode == 'requeue' then
      redis.call('RPUSH', KEYS[5], entry)
    elseif mode == 'revive' then
      redis.call('LPUSH', KEYS[5], entry)
    elseif mode == 'handover' then
      redis.call('LPUSH', KEYS[9], entry)
    elseif mode == 'return' then
      redis.call('RPUSH', KEYS[9], entry)
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
