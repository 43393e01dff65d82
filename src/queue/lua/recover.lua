-- Puts every job of an active list back on its pending list, atomically:
-- a daemon at start (what its previous run left), the reaper (a daemon that
-- died), and the end of shutdown (anything left over).
--
-- KEYS[1]  LIST  the active list (newest job at the left)
-- KEYS[2]  LIST  the pending list (consumed from the right)
-- KEYS[3]  HASH  leases: job id -> fencing token
-- KEYS[4]  HASH  crashes: job id -> times a daemon died running it
-- ARGV[1]  "1" to count a crash for each job that was claimed (running)
-- ARGV[2]  the owner's token prefix, "<worker id>/"
--
-- Each job's lease is dropped when this list's owner holds it, so that
-- daemon can no longer settle it and the next claim issues a new one. A
-- lease held by another daemon (this entry was a duplicate copy of a job
-- running elsewhere) is left alone, and no crash is counted. Moving from the left of active
-- to the right of pending leaves the job taken first at the consuming end.
-- Returns the number of jobs moved.
local n = 0
while true do
  local entry = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not entry then
    break
  end
  n = n + 1
  local ok, job = pcall(cjson.decode, entry)
  if ok and type(job) == 'table' and type(job.id) == 'string' then
    local lease = redis.call('HGET', KEYS[3], job.id)
    if lease and string.sub(lease, 1, #ARGV[2]) == ARGV[2] then
      redis.call('HDEL', KEYS[3], job.id)
      if ARGV[1] == '1' then
        redis.call('HINCRBY', KEYS[4], job.id, 1)
      end
    end
  end
end
return n
