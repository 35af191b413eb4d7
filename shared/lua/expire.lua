-- End a task that is still running long after its timeout: its worker neither
-- finished it nor died, so the reconciliation pass ends it here.
-- KEYS: task hash, event stream, instance hash, lease key, task stream, instance queue,
--       busy hash.
-- ARGV: events maxlen, consumer group, seconds allowed past the timeout, instance rule
--       after a timeout, instance rule after a cancel.
-- Returns {'expired', owner} or {'skip', why}.
local task_key, events_key, instances_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream_key, queue_key, busy_key = KEYS[5], KEYS[6], KEYS[7]
local maxlen, group, slack, timeout_rule, cancel_rule = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]

local status = redis.call('HGET', task_key, 'status')
if status ~= 'running' and status ~= 'cancelling' then
  return {'skip', status or 'missing'}
end
local started = tonumber(redis.call('HGET', task_key, 'started_at') or '')
local timeout = tonumber(redis.call('HGET', task_key, 'timeout') or '')
local t = now()
if not started or not timeout or started + timeout + slack > tonumber(t) then
  return {'skip', 'not overdue'}
end
local owner = redis.call('HGET', task_key, 'owner') or ''
local new_status, rule = 'timeout', timeout_rule
local message = 'overdue: its worker ' .. owner .. ' did not end it within its timeout of ' ..
  string.format('%g', timeout) .. ' s and ' .. string.format('%g', slack) .. ' s more'
if status == 'cancelling' then
  new_status, rule = 'cancelled', cancel_rule
end
redis.call('HSET', task_key, 'status', new_status, 'completed_at', t, 'updated_at', t, 'message', message)
if new_status == 'timeout' then
  redis.call('HSET', task_key, 'error', message)
end
redis.call('HINCRBY', task_key, 'version', 1)
local instance = redis.call('HGET', task_key, 'instance')
local changed = apply_instance_rule(task_key, instances_key, instance, rule)
redis.call('DEL', lease_key)
redis.call('HDEL', busy_key, owner)
local entry = redis.call('HGET', task_key, 'entry')
remove_entry(stream_key, group, entry, queue_key)
emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
return {'expired', owner}
