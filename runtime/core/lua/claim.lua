-- Claim a shard: succeeds only if its lease is still as the claimer saw it
-- (owner and epoch), and bumps the epoch so that the previous owner is fenced.
-- KEYS: 1 lease   ARGV: 1 new owner  2 expected owner ('' for none)  3 expected epoch
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
local owner = cur[1] or ''
local epoch = cur[2] or '0'
if owner ~= ARGV[2] or epoch ~= ARGV[3] then
  return false
end
local new = tonumber(epoch) + 1
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', new)
return new
