-- Move a task to running for one worker, creating it first when the intake has not.
-- KEYS: task hash, event stream, instance hash, lease key, task stream, instance queue,
--       busy hash.
-- ARGV: events maxlen, owner, lease ms, instance status while running (or 'keep'),
--       instance rule after a cancel, consumer group, stream entry id, 'registered' to
--       refuse a task that is not registered yet, then the field/value pairs used when
--       the task must be created.
-- Returns one of:
--   {'ok', attempts}           the worker owns the task now
--   {'busy', holder}           another live worker holds its lease
--   {'wait', entry}            an earlier task of the same instance must end first
--   {'finished', status}       it has ended; the entry is acknowledged here
--   {'cancel_requested'}       a stored cancel request must be applied first
--   {'duplicate', entry}       the id belongs to an earlier entry
--   {'unregistered'}           not registered yet, and ARGV 8 asked not to create it
local task_key, events_key, instances_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream_key, queue_key, busy_key = KEYS[5], KEYS[6], KEYS[7]
local maxlen, owner, lease_ms, running_rule = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cancel_rule, group, entry = ARGV[5], ARGV[6], ARGV[7]

local status = redis.call('HGET', task_key, 'status')
if not status then
  -- Registering a task requires its id reserved in the task index first. That key is in
  -- another slot, so a caller that has not reserved the id requests a refusal here.
  if ARGV[8] == 'registered' then
    return {'unregistered'}
  end
  create_pending(task_key, events_key, maxlen, 9)
  status = 'pending'
end
local first_entry = redis.call('HGET', task_key, 'entry')
if first_entry ~= entry then
  return {'duplicate', first_entry or ''}
end
if TERMINAL[status] then
  redis.call('XACK', stream_key, group, entry)
  redis.call('XDEL', stream_key, entry)
  redis.call('ZREM', queue_key, queue_member(entry))
  return {'finished', status}
end
if redis.call('HEXISTS', task_key, 'cancel_request_user') == 1 then
  return {'cancel_requested'}
end

local instance = redis.call('HGET', task_key, 'instance')
if status == 'running' or status == 'cancelling' then
  local holder = redis.call('GET', lease_key)
  if holder and holder ~= owner then
    return {'busy', holder}
  end
  if status == 'cancelling' then
    -- The worker that was stopping it is gone: the cancel is complete.
    local t = now()
    redis.call('HSET', task_key, 'status', 'cancelled', 'completed_at', t, 'updated_at', t,
      'message', 'cancelled; its worker was gone')
    redis.call('HINCRBY', task_key, 'version', 1)
    local changed = false
    if instance ~= '' and cancel_rule ~= 'keep' then
      local target = cancel_rule
      if cancel_rule == 'restore' then
        target = redis.call('HGET', task_key, 'instance_before') or ''
        if target == '' then target = 'unknown' end
      end
      redis.call('HSET', instances_key, instance, target)
      changed = true
    end
    redis.call('XACK', stream_key, group, entry)
    redis.call('XDEL', stream_key, entry)
    redis.call('ZREM', queue_key, queue_member(entry))
    emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
    return {'finished', 'cancelled'}
  end
end
if not ALLOWED[status]['running'] then
  return {'finished', status}
end

if instance ~= '' then
  redis.call('ZADD', queue_key, 'NX', 0, queue_member(entry))
  local head = queue_head(queue_key, stream_key)
  if head and head ~= entry then
    return {'wait', head}
  end
end

local t = now()
local changed = false
if instance ~= '' and running_rule ~= 'keep' then
  if status == 'pending' then
    redis.call('HSET', task_key, 'instance_before', redis.call('HGET', instances_key, instance) or '')
  end
  redis.call('HSET', instances_key, instance, running_rule)
  changed = true
end

local attempts = redis.call('HINCRBY', task_key, 'attempts', 1)
redis.call('HINCRBY', task_key, 'version', 1)
redis.call('HSET', task_key, 'status', 'running', 'owner', owner, 'started_at', t,
  'updated_at', t, 'progress', '0', 'message', '')
redis.call('SET', lease_key, owner, 'PX', lease_ms)
redis.call('HSET', busy_key, owner, redis.call('HGET', task_key, 'id') .. ' ' .. t)
emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
return {'ok', attempts}
