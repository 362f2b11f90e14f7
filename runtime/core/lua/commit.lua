-- One transaction's commit (or several messages' of one actor, committed together):
-- state, replies, outbox entries and timer changes, all or nothing, and only while
-- this node holds the shard at this epoch.
-- A fired timer (p.tf) or a settled outbox entry (p.od: its result was handed to
-- this actor) is consumed in the same step, and the commit is refused if it is gone.
-- An outbox entry named in p.ow is deleted if it was never attempted; if one was,
-- the commit is refused ('started'): an effect is withdrawn or performed, not both.
-- With p.del the actor deletes itself instead: its outbox entries are still written
-- (effects it promised), and its checkpoint, reply cache, notification stream, member
-- set, set memberships and the timers named in p.tc go.
-- Plugins' steps (p.x; see CheckpointStore.add_steps) run as part of this script:
-- every step's check before anything is written (a reason refuses the commit:
-- 'step', 'N:reason' for the Nth step), every step's apply after the commit's writes.
-- The chunks that define them (STEPS[name] = {check = fn, apply = fn}) precede this
-- text in the script the store loads.
--
-- KEYS: 1 lease  2 checkpoint  3 replies  4 reply times  5 shard actors
--       6 outbox  7 outbox queue  8 timer index  9 timer data  10 autonomous actors
--       11 notification stream  12 member set  13.. the steps' keys, in order
-- ARGV: 1 node id  2 epoch  3 expected seq  4 msgpack payload
-- Returns {1, seq} or {0, reason, detail}.
local lease = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if lease[1] ~= ARGV[1] or lease[2] ~= ARGV[2] then
  return {0, 'fenced', tostring(lease[1]) .. '@' .. tostring(lease[2])}
end
local seq = redis.call('HGET', KEYS[2], 'seq') or '0'
if seq ~= ARGV[3] then
  return {0, 'seq', seq}
end
local p = cmsgpack.unpack(ARGV[4])
local steps = {}
if p.x then  -- each {name, key count, args...}
  local k = 12
  for i, x in ipairs(p.x) do
    local keys = {}
    for j = 1, x[2] do keys[j] = KEYS[k + j] end
    k = k + x[2]
    local step, args = STEPS[x[1]], {unpack(x, 3)}
    local refused = step.check and step.check(keys, args)
    if refused then
      return {0, 'step', i .. ':' .. refused}
    end
    steps[i] = {step.apply, keys, args}
  end
end
if p.ow then  -- checked before anything is written
  for _, id in ipairs(p.ow) do
    local e = redis.call('HGET', KEYS[6], id)
    if e then
      -- cmsgpack reads no bin type: an entry holding bytes counts as started
      local ok, entry = pcall(cmsgpack.unpack, e)
      if not ok or (entry.attempts or 0) > 0 then
        return {0, 'started', id}
      end
    end
  end
  for _, id in ipairs(p.ow) do
    redis.call('HDEL', KEYS[6], id)
    redis.call('ZREM', KEYS[7], id)
  end
end
if p.tf then
  local cur = redis.call('HGET', KEYS[9], p.tf[1])
  if not cur or string.sub(cur, 1, 32) ~= p.tf[2] then
    return {0, 'timer', p.tf[1]}
  end
  redis.call('HDEL', KEYS[9], p.tf[1])
  redis.call('ZREM', KEYS[8], p.tf[1])
end
if p.od then
  if redis.call('HDEL', KEYS[6], p.od) == 0 then
    return {0, 'settled', p.od}
  end
  redis.call('ZREM', KEYS[7], p.od)
end
for _, e in ipairs(p.ob) do
  redis.call('HSET', KEYS[6], e[1], e[2])
  redis.call('ZADD', KEYS[7], e[3], e[1])
end
for _, k in ipairs(p.tc) do
  redis.call('HDEL', KEYS[9], k)
  redis.call('ZREM', KEYS[8], k)
end
for _, s in ipairs(steps) do
  if s[1] then s[1](s[2], s[3]) end
end
if p.del then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[11], KEYS[12])
  redis.call('SREM', KEYS[5], p.n)
  redis.call('SREM', KEYS[10], p.n)
  return {1, 0}
end
redis.call('HSET', KEYS[2], 'state', p.st, 'pstate', p.ps, 'version', p.v,
           'seq', p.seq, 'updated', p.now)
if seq == '0' then
  redis.call('HSET', KEYS[2], 'created', p.now)
  redis.call('SADD', KEYS[5], p.n)
end
if p.au then
  redis.call('SADD', KEYS[10], p.n)
end
if p.rr then
  for _, r in ipairs(p.rr) do
    redis.call('HSET', KEYS[3], r[1], r[2])
    redis.call('ZADD', KEYS[4], p.now, r[1])
  end
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. p.cut, 'LIMIT', 0, 64)
  local extra = redis.call('ZCARD', KEYS[4]) - #old - tonumber(p.rmax)
  if extra > 0 then
    local more = redis.call('ZRANGE', KEYS[4], #old, #old + math.min(extra, 64) - 1)
    for _, r in ipairs(more) do old[#old + 1] = r end
  end
  for _, r in ipairs(old) do
    redis.call('HDEL', KEYS[3], r)
    redis.call('ZREM', KEYS[4], r)
  end
end
for _, t in ipairs(p.ts) do
  redis.call('HSET', KEYS[9], t[1], t[2])
  redis.call('ZADD', KEYS[8], t[3], t[1])
end
if p.mr then
  redis.call('SREM', KEYS[12], unpack(p.mr))
end
if p.ma then
  redis.call('SADD', KEYS[12], unpack(p.ma))
end
for _, n in ipairs(p.nt) do
  redis.call('XADD', KEYS[11], 'MAXLEN', '~', p.ntmax, '*', 'd', n)
end
return {1, p.seq}
