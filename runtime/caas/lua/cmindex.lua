-- A commitment's summary into its principal's index (see troth.caas.index), as
-- functions: the index composes them into a script of their own, or into the commit
-- script as the step 'cmindex' (a single Redis: the index moves with the commitment).
-- A summary is applied only if it is newer (rev) than the one the index holds: an
-- outbox's updates may repeat or arrive out of order.
-- A summary whose status is "retired" removes the commitment from the index (and
-- its dedup_key binding) and leaves a tombstone that expires after ARGV[4] ms.
-- A new row joins the metadata indexes named (zsets: id -> created); a retired one
-- leaves them.
-- KEYS: 1 all (zset)  2 summaries (hash)  3 counts (hash)  4 dedup (hash)
--       5 ended (zset: finished id -> when it is retired)  6 this id's tombstone (string)
--       7.. one zset per status, in the order of ARGV[8..]
--       then the metadata indexes of this commitment (zsets), if any
--       last, with ARGV[7]: the set of principals
-- ARGV: 1 id  2 rev  3 summary JSON  4 tombstone ms
--       5 dedup_key to bind the id to ('' none)  6 pending quota to check ('' none)
--       7 principal to add to the set of principals with a new row ('' none)
--       8.. the status names

-- A creation is refused ('dedup:ID') if its dedup_key is bound to another id, or
-- ('quota:N') when the principal has N pending commitments and N is its quota.
local function cmindex_check(KEYS, ARGV)
  if ARGV[5] ~= '' then
    local bound = redis.call('HGET', KEYS[4], ARGV[5])
    if bound and bound ~= ARGV[1] then
      return 'dedup:' .. bound
    end
  end
  if ARGV[6] ~= '' then
    local pending = tonumber(redis.call('HGET', KEYS[3], 'pending') or '0')
    if pending >= tonumber(ARGV[6]) then
      return 'quota:' .. pending
    end
  end
  return nil
end

-- 1 if applied, 0 if the index holds this summary or a newer one.
local function cmindex_apply(KEYS, ARGV)
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
  local nstatus = #ARGV - 7
  local first_meta = 7 + nstatus
  local last_meta = #KEYS - (ARGV[7] ~= '' and 1 or 0)
  local created = new.created_ms
  for i = 1, nstatus do
    local name = ARGV[7 + i]
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
    for i = first_meta, last_meta do
      redis.call('ZREM', KEYS[i], id)
    end
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
  elseif old_status then
    redis.call('ZREM', KEYS[5], id) -- running again (a retry of a failed one)
  end
  if ARGV[5] ~= '' then
    redis.call('HSETNX', KEYS[4], ARGV[5], id)
  end
  if ARGV[7] ~= '' and not old then
    redis.call('SADD', KEYS[#KEYS], ARGV[7])
  end
  if not old then -- (a row's place in the listing, its creation, never moves)
    redis.call('ZADD', KEYS[1], created, id)
    for i = first_meta, last_meta do
      redis.call('ZADD', KEYS[i], created, id)
    end
  end
  redis.call('HSET', KEYS[2], id, ARGV[3])
  return 1
end
