-- Apply a cancel request to a task.
-- KEYS: task hash, event stream, task stream.
-- ARGV: events maxlen, consumer group, instance queue key prefix, requesting user ('' for
--       an administrator), reason, and 'stored' to take the user and reason from the
--       request fields a producer wrote into the task hash (cancel_request_user, with
--       '*' for an administrator, and cancel_request_reason) instead.
-- Returns {'cancelled'} (it had not started), {'cancelling', owner} (its worker must
-- stop it), {'queued'} (the task is not registered yet; the request waits in its hash),
-- {'finished', status}, {'forbidden', owner user}, {'invalid'} (an empty stored user)
-- or {'none'} (no stored request).
local task_key, events_key, stream_key = KEYS[1], KEYS[2], KEYS[3]
local maxlen, group, queue_prefix = ARGV[1], ARGV[2], ARGV[3]
local user, reason = ARGV[4], ARGV[5]
local t = now()

local stored = ARGV[6] == 'stored'
if stored then
  user = redis.call('HGET', task_key, 'cancel_request_user')
  if not user then
    return {'none'}
  end
  reason = redis.call('HGET', task_key, 'cancel_request_reason') or ''
  redis.call('HDEL', task_key, 'cancel_request_user', 'cancel_request_reason')
  if user == '' then
    redis.call('HSET', task_key, 'cancel_error', 'cancel_request_user is empty: write a user id, or * for an administrator')
    return {'invalid'}
  end
  if user == '*' then
    user = ''
  end
end

-- A rejected request leaves the task as it was; only a stored request gets its reason
-- written back, into cancel_error, because its producer has no other way to learn it.
local function reject(message)
  if stored then
    redis.call('HSET', task_key, 'cancel_error', message)
  end
end

local status = redis.call('HGET', task_key, 'status')
if not status then
  redis.call('HSET', task_key, 'cancel_request_user', user == '' and '*' or user, 'cancel_request_reason', reason)
  return {'queued'}
end
if TERMINAL[status] then
  reject('the task had already ended as ' .. status)
  return {'finished', status}
end
local task_user = redis.call('HGET', task_key, 'user')
if user ~= '' and user ~= task_user then
  reject('user ' .. user .. ' may not cancel a task of user ' .. task_user)
  return {'forbidden', task_user}
end

redis.call('HDEL', task_key, 'cancel_error')
redis.call('HSET', task_key, 'cancelled_by', user == '' and 'admin' or user, 'cancel_reason', reason,
  'cancel_requested_at', t, 'updated_at', t)
if status == 'pending' then
  local entry = redis.call('HGET', task_key, 'entry')
  redis.call('HSET', task_key, 'status', 'cancelled', 'completed_at', t, 'message', 'cancelled before it started')
  redis.call('HINCRBY', task_key, 'version', 1)
  remove_entry(stream_key, group, entry, queue_prefix .. redis.call('HGET', task_key, 'instance'))
  emit(task_key, events_key, maxlen, nil, false)
  return {'cancelled'}
end
if status == 'running' then
  redis.call('HSET', task_key, 'status', 'cancelling', 'message', 'cancel requested')
  redis.call('HINCRBY', task_key, 'version', 1)
  emit(task_key, events_key, maxlen, nil, false)
end
return {'cancelling', redis.call('HGET', task_key, 'owner') or ''}
