-- Move a task to running for one worker, creating it first when the intake has not.
-- KEYS: task hash, event stream, instance hash, lease key.
-- ARGV: events maxlen, owner, lease ms, instance status while running (or 'keep'),
--       stream entry id, then field/value pairs used when the task must be created.
-- Returns {'ok', attempts}, {'busy', holder}, {'finished', status}, {'cancelling'}
-- or {'duplicate', entry of the first task with this id}.
local task_key, events_key, instances_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, owner, lease_ms, running_rule, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local status = redis.call('HGET', task_key, 'status')
if not status then
  create_pending(task_key, events_key, maxlen, 6)
  status = 'pending'
end

local first_entry = redis.call('HGET', task_key, 'entry')
if first_entry ~= entry then
  return {'duplicate', first_entry or ''}
end
if TERMINAL[status] then
  return {'finished', status}
end
if status == 'running' or status == 'cancelling' then
  local holder = redis.call('GET', lease_key)
  if holder and holder ~= owner then
    return {'busy', holder}
  end
  if status == 'cancelling' then
    return {'cancelling'}
  end
end
if not ALLOWED[status]['running'] then
  return {'finished', status}
end

local t = now()
local instance = redis.call('HGET', task_key, 'instance')
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
emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
return {'ok', attempts}
