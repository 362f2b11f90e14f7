-- Forget a principal's previous signing secret once its grace period has ended (the
-- hash KEYS[1]; see troth.caas.signing). ARGV[1]: its previous_until_ms as read (0
-- for none), so that a rotation made meanwhile (a new previous) is left alone.
if (redis.call('HGET', KEYS[1], 'previous_until_ms') or '0') == ARGV[1] then
  return redis.call('HDEL', KEYS[1], 'previous', 'previous_until_ms')
end
return 0
