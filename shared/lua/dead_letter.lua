-- Move a rejected entry to the dead-letter stream, then acknowledge and delete it, and
-- drop it from its instance queue so that it holds up no later task. The task is also
-- recorded as failed with the reason when its id is known and was free, or when the
-- task's current entry is this one. The panel then finds the reason in the status hash,
-- the event stream and SQL.
-- KEYS: dead-letter stream, task stream, instance queue (may be a key that does not
--       exist), task hash, event stream.
-- ARGV: dead maxlen, consumer group, entry id, reason, entry fields as JSON, events
--       maxlen, then the field/value pairs of the failed task ('' pairs for none).
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'entry', ARGV[3], 'reason', ARGV[4],
  'fields', ARGV[5], 'at', now())
remove_entry(KEYS[2], ARGV[2], ARGV[3], KEYS[3])
if #ARGV <= 6 then
  return 1
end
local status = redis.call('HGET', KEYS[4], 'status')
local t = now()
if not status then
  -- A new task is created as failed in one step, with one event.
  local fields = {}
  for i = 7, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  redis.call('HSET', KEYS[4], 'progress', '0', 'result', '', 'attempts', '0', 'owner', '', 'version', '1',
    'created_at', t, 'started_at', '', unpack(fields))
elseif redis.call('HGET', KEYS[4], 'entry') ~= ARGV[3] or TERMINAL[status] then
  return 1
else
  redis.call('HINCRBY', KEYS[4], 'version', 1)
end
redis.call('HSET', KEYS[4], 'status', 'failed', 'error', 'rejected: ' .. ARGV[4],
  'message', 'rejected; the entry is in the dead-letter stream', 'completed_at', t, 'updated_at', t)
emit(KEYS[4], KEYS[5], ARGV[6], nil, false)
return 2
