-- Record a running task's progress and renew its lease.
-- KEYS: task hash, event stream, lease key.
-- ARGV: events maxlen, owner, progress, message, lease ms.  Returns 1, or 0 when fenced.
local status = redis.call('HGET', KEYS[1], 'status')
if (status ~= 'running' and status ~= 'cancelling') or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'message', ARGV[4], 'updated_at', now())
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PEXPIRE', KEYS[3], ARGV[5])
emit(KEYS[1], KEYS[2], ARGV[1], nil, false)
return 1
