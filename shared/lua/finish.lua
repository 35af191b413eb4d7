-- Move a task out of running for the worker that owns it.
-- KEYS: task hash, event stream, instance hash, lease key, task stream.
-- ARGV: events maxlen, owner, new status, instance rule (a status, 'restore' or 'keep'),
--       consumer group, stream entry id, then field/value pairs to set.
-- A terminal status acknowledges and deletes the stream entry in the same step.
-- Returns {'ok'}, {'missing'}, {'fenced', status} or {'illegal', status}.
local task_key, events_key, instances_key, lease_key, stream_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local maxlen, owner, new_status, rule, group, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local status = redis.call('HGET', task_key, 'status')
if not status then
  return {'missing'}
end
if redis.call('HGET', task_key, 'owner') ~= owner then
  return {'fenced', status}
end
if not ALLOWED[status][new_status] then
  return {'illegal', status}
end

local t = now()
for i = 7, #ARGV, 2 do
  redis.call('HSET', task_key, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', task_key, 'status', new_status, 'updated_at', t)
if TERMINAL[new_status] then
  redis.call('HSET', task_key, 'completed_at', t)
end
if new_status == 'pending' then
  redis.call('HSET', task_key, 'owner', '', 'started_at', '')
end
redis.call('HINCRBY', task_key, 'version', 1)

local instance = redis.call('HGET', task_key, 'instance')
local changed = false
if instance ~= '' and rule ~= 'keep' then
  local target = rule
  if rule == 'restore' then
    target = redis.call('HGET', task_key, 'instance_before') or ''
    if target == '' then
      target = 'unknown'
    end
  end
  redis.call('HSET', instances_key, instance, target)
  changed = true
end

if redis.call('GET', lease_key) == owner then
  redis.call('DEL', lease_key)
end
if TERMINAL[new_status] then
  redis.call('XACK', stream_key, group, entry)
  redis.call('XDEL', stream_key, entry)
end
emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
return {'ok'}
