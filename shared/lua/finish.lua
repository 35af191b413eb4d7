-- Move a task out of running for the worker that owns it.
-- KEYS: task hash, event stream, instance hash, lease key, task stream, instance queue,
--       busy hash, retry schedule (sorted set of entry ids by due time in milliseconds).
-- ARGV: events maxlen, owner, new status, instance rule, instance rule after a cancel,
--       consumer group, stream entry id, handoff consumer, the due time in milliseconds
--       of an automatic retry ('' for none; the new status is then pending), then
--       field/value pairs to set.
--       An instance rule is a status, 'restore' or 'keep'. The handoff consumer gets the
--       instance's next task; '' hands nothing over.
-- A terminal status acknowledges and deletes the stream entry in the same step. A task
-- put back to pending while a cancel is under way ends cancelled instead.
-- Returns {'ok'}, {'ok', next entry id, next entry fields} when the instance's next
-- task was handed to the consumer, {'missing'}, {'fenced', status} or {'illegal', status}.
local task_key, events_key, instances_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream_key, queue_key, busy_key = KEYS[5], KEYS[6], KEYS[7]
local maxlen, owner, new_status, rule = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cancel_rule, group, entry, handoff_consumer = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local retry_due, retries_key = ARGV[9], KEYS[8]
local FIRST_FIELD = 10

local status = redis.call('HGET', task_key, 'status')
if not status then
  return {'missing'}
end
if redis.call('HGET', task_key, 'owner') ~= owner then
  return {'fenced', status}
end
if new_status == 'pending' and status == 'cancelling' then
  -- The task was stopped and a cancel had been accepted: it must not run again.
  new_status = 'cancelled'
  rule = cancel_rule
  retry_due = ''
  for i = FIRST_FIELD, #ARGV, 2 do
    if ARGV[i] == 'message' then
      ARGV[i + 1] = 'cancelled while the worker was shutting down'
    end
  end
end
if not ALLOWED[status][new_status] then
  return {'illegal', status}
end

local t = now()
for i = FIRST_FIELD, #ARGV, 2 do
  redis.call('HSET', task_key, ARGV[i], ARGV[i + 1])
end
if retry_due ~= '' then
  redis.call('HINCRBY', task_key, 'retries', 1)
  redis.call('HSET', task_key, 'retry_at', string.format('%.3f', tonumber(retry_due) / 1000))
  redis.call('ZADD', retries_key, retry_due, entry)
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
local changed = apply_instance_rule(task_key, instances_key, instance, rule)

if redis.call('GET', lease_key) == owner then
  redis.call('DEL', lease_key)
end
redis.call('HDEL', busy_key, owner)
local reply = {'ok'}
if TERMINAL[new_status] then
  remove_entry(stream_key, group, entry, queue_key)
  if handoff_consumer ~= '' then
    local head = queue_head(queue_key, stream_key)
    if head then
      local claimed = redis.call('XCLAIM', stream_key, group, handoff_consumer, 0, head)
      if claimed[1] then
        reply = {'ok', claimed[1][1], claimed[1][2]}
      end
    end
  end
end
emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
return reply
