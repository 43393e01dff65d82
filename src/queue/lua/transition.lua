-- Moves one job out of a daemon's active list, atomically: the ack of a
-- requeue (to pending), of a dead-letter (to dead), or the rewrite of an
-- element in place (active -> active, e.g. after assigning an id).
--
-- KEYS[1]  LIST  source: the daemon's active list
-- KEYS[2]  LIST  destination
-- ARGV[1]  the exact element to remove from KEYS[1]
-- ARGV[2]  the element to push onto KEYS[2]
-- ARGV[3]  "R" to RPUSH (the consuming end of a pending list: taken next),
--          "L" to LPUSH (newest end)
--
-- Returns 1 when moved; 0 when ARGV[1] is not in KEYS[1]. Then the job is
-- no longer this daemon's (recovered by another one) and nothing is pushed,
-- so a job is never duplicated by a late transition.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
if ARGV[3] == 'R' then
  redis.call('RPUSH', KEYS[2], ARGV[2])
else
  redis.call('LPUSH', KEYS[2], ARGV[2])
end
return 1
