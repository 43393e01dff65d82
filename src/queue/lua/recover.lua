-- Puts every job of an active list back on its pending list, atomically.
-- Used by a daemon at start (jobs its previous run left behind) and at the
-- end of shutdown (anything still listed as active).
--
-- KEYS[1]  LIST  the active list (newest job at the left)
-- KEYS[2]  LIST  the pending list (consumed from the right)
--
-- Moving from the left of active to the right of pending leaves the job that
-- was taken first at the consuming end: it is the next one taken.
-- Returns the number of jobs moved.
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do
  n = n + 1
end
return n
