-- An operator's change to one outbox entry (re-drive or purge), made only if the
-- entry is still exactly what the operator read (a compare-and-set on its bytes), so
-- it never overwrites an attempt's record. The dispatcher leaves dead and uncertain
-- entries alone, which are the only ones an operator changes.
-- KEYS: 1 outbox hash  2 outbox queue
-- ARGV: 1 entry id  2 the bytes read  3 new bytes ('' deletes)  4 due ms ('' none)
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  if ARGV[4] ~= '' then
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  end
end
return 1
