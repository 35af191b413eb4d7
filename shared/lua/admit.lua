-- Register a task as pending, unless it exists already.
-- KEYS: task hash, event stream.  ARGV: events maxlen, then field/value pairs.
-- Returns the task's current status, or 'cancel_requested' when a producer stored a
-- cancel request that must be applied.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  if create_pending(KEYS[1], KEYS[2], ARGV[1], ARGV, 2) then
    -- The hash contains only what was just written, so no cancel request.
    return 'pending'
  end
  status = 'pending'
end
if not TERMINAL[status] and redis.call('HEXISTS', KEYS[1], 'cancel_request_user') == 1 then
  return 'cancel_requested'
end
return status
