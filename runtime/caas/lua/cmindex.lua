-- Apply a commitment's summary to its principal's index, only if it is newer than
-- what the index holds (outbox deliveries may repeat or arrive out of order).
-- KEYS: 1 all (zset)  2 summaries (hash)  3 counts (hash)  4.. one zset per status,
--       in the order of ARGV[4..]
-- ARGV: 1 id  2 rev  3 summary JSON  4.. the status names  (then) new status
local id, rev = ARGV[1], tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[2], id)
local old_status = nil
if old then
  local o = cjson.decode(old)
  if tonumber(o.rev) >= rev then
    return 0
  end
  old_status = o.status
end
local new = cjson.decode(ARGV[3])
local nstatus = #KEYS - 3
local created = new.created_ms
for i = 1, nstatus do
  local name = ARGV[3 + i]
  if name == old_status then
    redis.call('ZREM', KEYS[3 + i], id)
    redis.call('HINCRBY', KEYS[3], name, -1)
  end
  if name == new.status then
    redis.call('ZADD', KEYS[3 + i], created, id)
    redis.call('HINCRBY', KEYS[3], name, 1)
  end
end
redis.call('ZADD', KEYS[1], created, id)
redis.call('HSET', KEYS[2], id, ARGV[3])
return 1
