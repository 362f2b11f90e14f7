-- Release a shard this node owns at this epoch; the epoch is kept so that the
-- next claim bumps it again.
-- KEYS: 1 lease   ARGV: 1 owner  2 epoch
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', '')
return 1
