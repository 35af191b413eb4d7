-- Helpers shared by every state script. The ALLOWED transition table is generated
-- from shared/states.py and placed above this text when the scripts are loaded.

local TERMINAL = {completed = true, failed = true, timeout = true, cancelled = true}

local function now()
  local t = redis.call('TIME')
  return string.format('%d.%06d', t[1], t[2])
end

-- Entries kept in a task's history list (`<prefix>:{<provider>}:history:<id>`), newest last.
local HISTORY_LENGTH = 100

-- Append the task's full current state to its provider's event stream, and a short
-- line to the task's history list. `known`, when given, is the whole task hash as
-- field/value pairs, so the hash need not be read back. emit appends to it.
local function emit(task_key, events_key, maxlen, instance_status, instance_changed, known)
  local flat = known or redis.call('HGETALL', task_key)
  local state = {}
  for i = 1, #flat, 2 do
    state[flat[i]] = flat[i + 1]
  end
  -- A provider id contains no '}', so the first '}:task:' ends the hash tag.
  local history_key = string.gsub(task_key, '}:task:', '}:history:', 1)
  local status = state.status
  local line = {at = state.updated_at, status = status, progress = state.progress, message = state.message,
    attempt = state.attempts}
  local error_text = state.error
  if status == 'running' then
    line.worker = state.owner
  elseif error_text and error_text ~= '' and (TERMINAL[status] or status == 'pending') then
    line.error = string.sub(error_text, 1, 500)
  end
  if redis.call('RPUSH', history_key, cjson.encode(line)) > HISTORY_LENGTH then
    redis.call('LTRIM', history_key, -HISTORY_LENGTH, -1)
  end
  flat[#flat + 1] = 'instance_status'
  flat[#flat + 1] = instance_status or ''
  flat[#flat + 1] = 'instance_changed'
  flat[#flat + 1] = instance_changed and '1' or '0'
  -- Events are trimmed by the SQL mirror once written; maxlen '0' sets no other cap.
  if maxlen == '0' or maxlen == 0 then
    return redis.call('XADD', events_key, '*', unpack(flat))
  end
  return redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', unpack(flat))
end

-- Create the task hash in state pending from the field/value pairs of `args`, starting
-- at index `first`, whose names differ from each other and from the fields set here.
-- Returns true when the hash contains no other fields. It may: a producer can store a
-- cancel request in it before the task is registered.
local function create_pending(task_key, events_key, maxlen, args, first)
  local t = now()
  local fields = {'status', 'pending', 'progress', '0', 'message', '', 'error', '', 'result', '', 'attempts', '0',
    'owner', '', 'version', '1', 'created_at', t, 'updated_at', t, 'started_at', '', 'completed_at', ''}
  for i = first, #args do
    fields[#fields + 1] = args[i]
  end
  redis.call('HSET', task_key, unpack(fields))
  local alone = redis.call('HLEN', task_key) * 2 == #fields
  emit(task_key, events_key, maxlen, nil, false, alone and fields or nil)
  return alone
end

-- Turn a stream entry id into a member of an instance queue. Both parts are padded
-- with zeros, so the members of a sorted set with equal scores sort in stream order.
local function queue_member(entry_id)
  local millis, sequence = string.match(entry_id, '^(%d+)-(%d+)$')
  return string.rep('0', 15 - #millis) .. millis .. '-' .. string.rep('0', 10 - #sequence) .. sequence
end

local function entry_from_member(member)
  local millis, sequence = string.match(member, '^0*(%d+)-0*(%d+)$')
  return millis .. '-' .. sequence
end

-- Return the first entry of an instance queue that still waits in the task stream,
-- dropping members whose entry is gone (a task that ended without reaching the queue's end).
-- `present`, when given, is an entry known to be in the stream, which needs no check.
local function queue_head(queue_key, stream_key, present)
  local present_member = present and queue_member(present)
  while true do
    local head = redis.call('ZRANGE', queue_key, 0, 0)[1]
    if not head then
      return nil
    end
    if head == present_member then
      return present
    end
    local entry = entry_from_member(head)
    if #redis.call('XRANGE', stream_key, entry, entry) > 0 then
      return entry
    end
    redis.call('ZREM', queue_key, head)
  end
end

-- Acknowledge and delete a task's stream entry, and drop it from its instance queue,
-- once the task has ended or its entry was rejected.
local function remove_entry(stream_key, group, entry, queue_key)
  redis.call('XACK', stream_key, group, entry)
  redis.call('XDEL', stream_key, entry)
  redis.call('ZREM', queue_key, queue_member(entry))
end

local function instance_status(instances_key, instance)
  if instance == nil or instance == '' then
    return nil
  end
  return redis.call('HGET', instances_key, instance) or ''
end

-- Set an instance's status after one of its tasks ended or went back to pending.
-- `rule` is a status, 'restore' (the status from before the task, or 'unknown') or
-- 'keep'. Returns true and the status written when the instance hash was written.
local function apply_instance_rule(task_key, instances_key, instance, rule)
  if instance == nil or instance == '' or rule == 'keep' then
    return false
  end
  local target = rule
  if rule == 'restore' then
    target = redis.call('HGET', task_key, 'instance_before') or ''
    if target == '' then
      target = 'unknown'
    end
  end
  redis.call('HSET', instances_key, instance, target)
  return true, target
end
