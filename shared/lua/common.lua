-- Helpers shared by every state script. The ALLOWED transition table is generated
-- from shared/states.py and placed above this text when the scripts are loaded.

local TERMINAL = {completed = true, failed = true, timeout = true, cancelled = true}

local function now()
  local t = redis.call('TIME')
  return string.format('%d.%06d', t[1], t[2])
end

-- Append the task's full current state to its provider's event stream.
local function emit(task_key, events_key, maxlen, instance_status, instance_changed)
  local flat = redis.call('HGETALL', task_key)
  flat[#flat + 1] = 'instance_status'
  flat[#flat + 1] = instance_status or ''
  flat[#flat + 1] = 'instance_changed'
  flat[#flat + 1] = instance_changed and '1' or '0'
  return redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', unpack(flat))
end

-- Create the task hash in state pending from field pairs in ARGV, starting at `first`.
local function create_pending(task_key, events_key, maxlen, first)
  local t = now()
  local fields = {}
  for i = first, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  redis.call('HSET', task_key, 'status', 'pending', 'progress', '0', 'message', '', 'error', '',
    'result', '', 'attempts', '0', 'owner', '', 'version', '1', 'created_at', t, 'updated_at', t,
    'started_at', '', 'completed_at', '', unpack(fields))
  emit(task_key, events_key, maxlen, nil, false)
end

local function instance_status(instances_key, instance)
  if instance == nil or instance == '' then
    return nil
  end
  return redis.call('HGET', instances_key, instance) or ''
end
