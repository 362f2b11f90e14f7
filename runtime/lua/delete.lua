-- An actor's last transaction: it deletes itself. Fenced and sequence-checked like
-- commit.lua; removes the checkpoint, the reply cache, the notification stream, the
-- actor's membership of the shard's sets and the timers named in the payload.
-- Outbox entries already committed stay: they are effects the actor promised.
--
-- KEYS: as commit.lua.   ARGV: as commit.lua.   Returns {1, 0} or {0, reason, detail}.
local lease = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then
  return {0, 'fenced', tostring(lease[1]) .. '@' .. tostring(lease[2])}
end
local seq = redis.call('HGET', KEYS[2], 'seq') or '0'
if seq ~= ARGV[3] then
  return {0, 'seq', seq}
end
local p = cmsgpack.unpack(ARGV[4])
if p.tf then
  local cur = redis.call('HGET', KEYS[9], p.tf[1])
  if not cur or string.sub(cur, 1, 32) ~= p.tf[2] then
    return {0, 'timer', p.tf[1]}
  end
  redis.call('HDEL', KEYS[9], p.tf[1])
  redis.call('ZREM', KEYS[8], p.tf[1])
end
for _, e in ipairs(p.ob) do
  redis.call('HSET', KEYS[6], e[1], e[2])
  redis.call('ZADD', KEYS[7], e[3], e[1])
end
for _, k in ipairs(p.tc) do
  redis.call('HDEL', KEYS[9], k)
  redis.call('ZREM', KEYS[8], k)
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[11])
redis.call('SREM', KEYS[5], p.n)
redis.call('SREM', KEYS[10], p.n)
return {1, 0}
