-- Put a failed, timed-out or cancelled task back in line as a new entry of its task
-- stream, keeping its attempts and history. This is the one move out of a terminal
-- status, and only an operator's retry request makes it.
-- KEYS: task hash, event stream, task stream.
-- ARGV: events maxlen, who asked, then the field/value pairs of the new entry.
-- Returns {'ok', new entry id}, {'missing'} or {'refused', status}.
local task_key, events_key, stream_key = KEYS[1], KEYS[2], KEYS[3]
local status = redis.call('HGET', task_key, 'status')
if not status then
  return {'missing'}
end
if status ~= 'failed' and status ~= 'timeout' and status ~= 'cancelled' then
  return {'refused', status}
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local entry = redis.call('XADD', stream_key, '*', unpack(fields))
local t = now()
redis.call('HDEL', task_key, 'retry_at', 'interrupted', 'interrupted_runs', 'cancelled_by', 'cancel_reason',
  'cancel_requested_at', 'cancel_error')
redis.call('HSET', task_key, 'status', 'pending', 'entry', entry, 'error', '', 'result', '', 'progress', '0',
  'message', 'retry requested by ' .. ARGV[2], 'owner', '', 'started_at', '', 'completed_at', '', 'updated_at', t,
  'retries', '0')
redis.call('HINCRBY', task_key, 'manual_retries', 1)
redis.call('HINCRBY', task_key, 'version', 1)
emit(task_key, events_key, ARGV[1], nil, false)
return {'ok', entry}
