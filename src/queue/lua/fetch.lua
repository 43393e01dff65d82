-- Takes up to ARGV[1] jobs of one queue without blocking, from its lists in
-- order (the stage pool lists a daemon reads, then pending), into the
-- daemon's active list: what one pipeline of LMOVEs per list does, in one
-- round trip for all the queue's lists. Used only for a queue whose pool
-- lists the daemon reads (a fleet with one pool pipelines LMOVEs on
-- pending, as before). All keys share the queue's hash slot.
--
-- KEYS[1]      LIST  the daemon's active list (destination)
-- KEYS[2..n]   LIST  sources, in the order they are read
-- ARGV[1]      most entries taken (at least 1)
--
-- Returns, for each entry taken in the order taken (each source emptied
-- from its right, the consuming end, before the next is read), a pair:
-- the index of its source among KEYS[2..n] (from 0) and the entry.
local max = tonumber(ARGV[1])
local out = {}
for i = 2, #KEYS do
  while #out < max do
    local entry = redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT')
    if not entry then
      break
    end
    out[#out + 1] = {i - 2, entry}
  end
  if #out >= max then
    break
  end
end
return out
