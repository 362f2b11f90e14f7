-- Write one outbox entry (the activity ledger), only while this node holds the
-- shard at this epoch: a fenced node can neither attempt nor record an effect.
-- KEYS: 1 lease  2 outbox  3 outbox queue
-- ARGV: 1 node id  2 epoch  3 entry id  4 entry ('' deletes it)  5 next attempt ms ('' dequeues)
--       6 the version the dispatcher holds ('' for any): a replaceable entry that a
--         later commit replaced is left alone
-- Returns 1 (written), 0 (gone), -1 (fenced), 2 (replaced meanwhile).
local lease = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then
  return -1
end
local current = redis.call('HGET', KEYS[2], ARGV[3])
if not current then
  return 0
end
if ARGV[6] ~= '' and current ~= ARGV[6] then
  return 2
end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 1
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[3], ARGV[3])
else
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
end
return 1
