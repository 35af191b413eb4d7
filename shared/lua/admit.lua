-- Register a task as pending, unless it exists already.
-- KEYS: task hash, event stream.  ARGV: events maxlen, then field/value pairs.
-- Returns the task's current status.
local status = redis.call('HGET', KEYS[1], 'status')
if status then
  return status
end
create_pending(KEYS[1], KEYS[2], ARGV[1], 2)
return 'pending'
