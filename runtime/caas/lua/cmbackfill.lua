-- Commitments that exist into metadata indexes (see troth.caas.index: an index of a
-- metadata key listed after commitments had it is built from their summaries).
-- A commitment retired since its summary was read has no summary row any more:
-- it is left out, so a retirement is never undone.
-- KEYS: 1 summaries (hash)  2.. one metadata index (zset) per commitment
-- ARGV: for each of KEYS[2..]: the commitment id, then its creation time (ms)
-- Returns how many were added.
local added = 0
for i = 2, #KEYS do
  local id, created = ARGV[2 * i - 3], ARGV[2 * i - 2]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    added = added + redis.call('ZADD', KEYS[i], created, id)
  end
end
return added
