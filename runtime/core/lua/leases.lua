-- Every shard's lease, in one call: what a heartbeat reads on a single Redis (on
-- Redis Cluster a script reaches one slot only, so there a pipeline reads them).
-- KEYS: the shards' lease hashes.
-- Returns {owner, epoch, owner, epoch, ...} in the order of KEYS (nil for none).
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'owner', 'epoch')
  out[2 * i - 1] = v[1]
  out[2 * i] = v[2]
end
return out
