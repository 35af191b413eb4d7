-- Move a task out of running for the worker that owns it.
-- KEYS: task hash, event stream, instance hash, lease key, task stream, instance queue,
--       busy hash, retry schedule (sorted set of entry ids by due time in milliseconds).
-- ARGV: events maxlen, owner, new status, instance rule, instance rule after a cancel,
--       consumer group, stream entry id, handoff consumer, and the due time in
--       milliseconds of an automatic retry ('' for none). With a due time the new status
--       is pending. Then come the number n of take arguments, the n take arguments, and
--       the field/value pairs to set.
--       An instance rule is a status, 'restore' or 'keep'. The handoff consumer gets the
--       instance's next task; '' hands nothing over. The take arguments are the instance
--       queue key prefix and the start arguments of take_entry.lua. With them, when no
--       task of the same instance is handed over, the script takes the stream's next new
--       entry for the handoff consumer and starts it, as take.lua does.
-- A terminal status acknowledges and deletes the stream entry in the same step. A task
-- put back to pending while a cancel is under way ends cancelled instead.
-- Returns {'ok'}, {'ok', next entry id, next entry fields} when the instance's next
-- task was handed to the consumer, {'taken', entry id, fields, start reply...} when a new
-- entry was taken (the start reply is empty when it was not started), {'missing'},
-- {'fenced', status} or {'illegal', status}.
local task_key, events_key, instances_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream_key, queue_key, busy_key = KEYS[5], KEYS[6], KEYS[7]
local maxlen, owner, new_status, rule = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cancel_rule, group, entry, handoff_consumer = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local retry_due, retries_key = ARGV[9], KEYS[8]
local take_count = tonumber(ARGV[10])
local FIRST_FIELD = 11 + take_count

local known = redis.call('HMGET', task_key, 'status', 'owner', 'version', 'instance')
local status = known[1]
if not status then
  return {'missing'}
end
if known[2] ~= owner then
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
local fields = {}
for i = FIRST_FIELD, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
if retry_due ~= '' then
  redis.call('HINCRBY', task_key, 'retries', 1)
  fields[#fields + 1] = 'retry_at'
  fields[#fields + 1] = string.format('%.3f', tonumber(retry_due) / 1000)
  redis.call('ZADD', retries_key, retry_due, entry)
end
local version = tonumber(known[3]) or 0
local more = {'status', new_status, 'updated_at', t, 'version', tostring(version + 1)}
for i = 1, #more do
  fields[#fields + 1] = more[i]
end
if TERMINAL[new_status] then
  fields[#fields + 1] = 'completed_at'
  fields[#fields + 1] = t
end
if new_status == 'pending' then
  local reset = {'owner', '', 'started_at', ''}
  for i = 1, #reset do
    fields[#fields + 1] = reset[i]
  end
end
redis.call('HSET', task_key, unpack(fields))

-- A create task's end may name the instance that it created.
local instance = known[4]
for i = FIRST_FIELD, #ARGV - 1, 2 do
  if ARGV[i] == 'instance' then
    instance = ARGV[i + 1]
  end
end
local changed, instance_now = apply_instance_rule(task_key, instances_key, instance, rule)

-- The owner check above means the lease is this owner's or has expired: another
-- worker that took the task over would have become its owner.
redis.call('DEL', lease_key)
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
emit(task_key, events_key, maxlen, instance_now or instance_status(instances_key, instance), changed)
if #reply == 1 and take_count > 0 and handoff_consumer ~= '' then
  local taken = take_entry(stream_key, group, handoff_consumer, ARGV[11], ARGV, 12)
  if taken[1] == 'entry' then
    taken[1] = 'taken'
    return taken
  end
end
return reply
