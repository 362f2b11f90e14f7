-- Rotate a principal's webhook signing secrets (the hash KEYS[1]; see troth.caas.signing).
-- ARGV: the new secret, now (Unix ms), until when the current one goes on signing
-- (Unix ms; 0: it stops at once), then the fields to return.
local current = redis.call('HGET', KEYS[1], 'current')
if current and ARGV[3] ~= '0' then
  redis.call('HSET', KEYS[1], 'previous', current, 'previous_until_ms', ARGV[3])
else
  redis.call('HDEL', KEYS[1], 'previous', 'previous_until_ms')
end
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'rotated_ms', ARGV[2])
return redis.call('HMGET', KEYS[1], unpack(ARGV, 4))
