-- Apply a commitment's summary to its principal's index, only if it is newer than
-- what the index holds (outbox deliveries may repeat or arrive out of order).
-- A summary whose status is "retired" removes the commitment from the index (and
-- its dedup_key binding) and leaves a tombstone that expires after ARGV[4] ms.
-- KEYS: 1 all (zset)  2 summaries (hash)  3 counts (hash)  4 dedup (hash)
--       5 ended (zset: finished id -> when it is retired)  6 this id's tombstone (string)
--       7.. one zset per status, in the order of ARGV[5..]
-- ARGV: 1 id  2 rev  3 summary JSON  4 tombstone ms  5.. the status names
local id, rev = ARGV[1], tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[2], id)
local old_status = nil
if old then
  local o = cjson.decode(old)
  if tonumber(o.rev) >= rev then
    return 0
  end
  old_status = o.status
elseif redis.call('EXISTS', KEYS[6]) == 1 then
  return 0 -- retired already: a late summary must not bring it back
end
local new = cjson.decode(ARGV[3])
local retired = new.status == 'retired'
local nstatus = #KEYS - 6
local created = new.created_ms
for i = 1, nstatus do
  local name = ARGV[4 + i]
  if name == old_status then
    redis.call('ZREM', KEYS[6 + i], id)
    redis.call('HINCRBY', KEYS[3], name, -1)
  end
  if name == new.status then
    redis.call('ZADD', KEYS[6 + i], created, id)
    redis.call('HINCRBY', KEYS[3], name, 1)
  end
end
if retired then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[5], id)
  if type(new.dedup_key) == 'string' and redis.call('HGET', KEYS[4], new.dedup_key) == id then
    redis.call('HDEL', KEYS[4], new.dedup_key)
  end
  redis.call('SET', KEYS[6], tostring(new.updated_ms), 'PX', tonumber(ARGV[4]))
  return 1
end
if type(new.retires_ms) == 'number' then
  redis.call('ZADD', KEYS[5], new.retires_ms, id)
elseif type(new.ended_ms) == 'number' then -- from a node before retires_ms
  redis.call('ZADD', KEYS[5], new.ended_ms, id)
else
  redis.call('ZREM', KEYS[5], id) -- running again (a retry of a failed one)
end
redis.call('ZADD', KEYS[1], created, id)
redis.call('HSET', KEYS[2], id, ARGV[3])
return 1
