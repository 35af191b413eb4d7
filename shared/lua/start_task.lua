-- start_task(KEYS, ARGV): move a task to running for one worker, creating it first when
-- the intake has not. start.lua calls it with its own KEYS and ARGV, and take.lua with
-- keys and arguments it builds for the entry it just delivered.
-- KEYS: task hash, event stream, instance hash, lease key, task stream, instance queue,
--       busy hash, dead-letter stream, provider's limit key (its value, when set, replaces
--       the limit in ARGV), and optionally the task index. With the index, the id of a
--       task that is not registered yet is reserved there before the task is created.
--       Only a caller whose keys are all on one server passes it, because the index is in
--       another slot.
-- ARGV: events maxlen, owner, lease ms, instance status while running (or 'keep'),
--       instance rule after a cancel, consumer group, stream entry id, 'registered' to
--       refuse a task that is not registered yet, what to do with an interrupted run
--       ('rerun', 'probe' or 'fail'), runs lost with their worker before a task counts as
--       poison, the provider's concurrency limit (-1 for none), the instance status after
--       an interrupted run is given up, dead-letter stream maxlen, then the field/value
--       pairs used when the task must be created.
-- An interrupted run is one whose worker died (the task is running with no live lease)
-- or one that a shutdown stopped and put back to pending.
-- Returns one of:
--   {'ok', attempts, retries}      the worker owns the task now and runs it
--   {'probe', attempts, retries}   the worker owns it and must probe the interrupted run first
--   {'busy', holder}               another live worker holds its lease
--   {'wait', entry}                an earlier task of the same instance must end first
--   {'full', running}              the provider runs as many tasks as its limit allows
--   {'delayed', retry_at}          an automatic retry is not due yet
--   {'finished', status}           it has ended; the entry is acknowledged here
--   {'interrupted', status}        its interrupted run was given up, or it was poison
--   {'cancel_requested'}           a stored cancel request must be applied first
--   {'duplicate', holder}          the id belongs to an earlier entry: `<provider> <entry>`
--                                  of the task that has it
--   {'unregistered'}               not registered yet, and ARGV 8 asked not to create it
local function start_task(KEYS, ARGV)
  local task_key, events_key, instances_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local stream_key, queue_key, busy_key, dead_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
  local maxlen, owner, lease_ms, running_rule = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  local cancel_rule, group, entry = ARGV[5], ARGV[6], ARGV[7]
  local on_interrupt, poison_runs, limit = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
  local given_up_rule, dead_maxlen = ARGV[12], ARGV[13]
  local stored_limit = tonumber(redis.call('GET', KEYS[9]) or '')
  if stored_limit then
    limit = stored_limit
  end
  local FIRST_FIELD = 14
  -- Owners kept in the task's `workers` field, newest last.
  local WORKERS_KEPT = 20

  local known = redis.call('HMGET', task_key, 'status', 'entry', 'cancel_request_user', 'instance', 'retry_at',
    'interrupted', 'workers', 'attempts', 'version', 'retries', 'id', 'provider')
  local status = known[1]
  if not status then
    -- Registering a task requires its id reserved in the task index first. That key is in
    -- another slot, so a caller that has not reserved the id requests a refusal here.
    if ARGV[8] == 'registered' then
      return {'unregistered'}
    end
    local index_key = KEYS[10]
    if index_key then
      local new_fields = {}
      for i = FIRST_FIELD, #ARGV - 1, 2 do
        new_fields[ARGV[i]] = ARGV[i + 1]
      end
      local task_id = new_fields.id or ''
      local reserver = (new_fields.provider or '') .. ' ' .. entry
      if redis.call('HSETNX', index_key, task_id, reserver) == 0 then
        local current = redis.call('HGET', index_key, task_id)
        if current and current ~= '' and current ~= reserver then
          return {'duplicate', current}
        end
      end
    end
    create_pending(task_key, events_key, maxlen, ARGV, FIRST_FIELD)
    known = redis.call('HMGET', task_key, 'status', 'entry', 'cancel_request_user', 'instance', 'retry_at',
      'interrupted', 'workers', 'attempts', 'version', 'retries', 'id', 'provider')
    status = 'pending'
  end
  local first_entry = known[2]
  if first_entry ~= entry then
    return {'duplicate', (known[12] or '') .. ' ' .. (first_entry or '')}
  end
  if TERMINAL[status] then
    remove_entry(stream_key, group, entry, queue_key)
    return {'finished', status}
  end
  if known[3] then
    return {'cancel_requested'}
  end

  local instance = known[4] or ''

  -- End the task here, without a worker: acknowledge its entry and set the instance.
  local function end_here(new_status, rule, field_pairs)
    local t = now()
    redis.call('HSET', task_key, 'status', new_status, 'completed_at', t, 'updated_at', t, unpack(field_pairs))
    redis.call('HINCRBY', task_key, 'version', 1)
    local changed = apply_instance_rule(task_key, instances_key, instance, rule)
    redis.call('DEL', lease_key)
    remove_entry(stream_key, group, entry, queue_key)
    emit(task_key, events_key, maxlen, instance_status(instances_key, instance), changed)
  end

  local interrupted = false
  if status == 'running' or status == 'cancelling' then
    local holder = redis.call('GET', lease_key)
    if holder and holder ~= owner then
      return {'busy', holder}
    end
    if status == 'cancelling' then
      -- The worker that was stopping it is gone: the cancel is complete.
      end_here('cancelled', cancel_rule, {'message', 'cancelled; its worker was gone'})
      return {'finished', 'cancelled'}
    end
    if not holder then
      interrupted = true
      local lost = redis.call('HINCRBY', task_key, 'interrupted_runs', 1)
      if lost >= poison_runs then
        local last_owner = redis.call('HGET', task_key, 'owner') or ''
        local reason = 'poison: its worker died during ' .. lost .. ' runs (last ' .. last_owner ..
          '); not run again'
        end_here('failed', given_up_rule, {'error', reason, 'message', 'moved to the dead-letter stream'})
        local public = {}
        for _, name in ipairs({'id', 'provider', 'type', 'instance', 'user', 'timeout', 'data', 'attempts', 'workers'}) do
          public[name] = redis.call('HGET', task_key, name) or ''
        end
        redis.call('XADD', dead_key, 'MAXLEN', '~', dead_maxlen, '*', 'entry', entry, 'reason', reason,
          'fields', cjson.encode(public), 'at', now())
        return {'interrupted', 'poison'}
      end
    end
  elseif status == 'pending' then
    local retry_at = known[5]
    if retry_at and retry_at ~= '' and tonumber(retry_at) > tonumber(now()) then
      return {'delayed', retry_at}
    end
    interrupted = known[6] == '1'
  end
  if not ALLOWED[status]['running'] then
    return {'finished', status}
  end

  if instance ~= '' then
    -- take_entry.lua marks its keys `queued`: it has just added the entry to the queue.
    if not KEYS.queued then
      redis.call('ZADD', queue_key, 'NX', 0, queue_member(entry))
    end
    -- The entry is in the stream: a task whose entry was removed has ended, and returned above.
    local head = queue_head(queue_key, stream_key, entry)
    if head and head ~= entry then
      return {'wait', head}
    end
  end

  if interrupted and on_interrupt == 'fail' then
    local last_owner = redis.call('HGET', task_key, 'owner') or ''
    local where = last_owner ~= '' and (' on ' .. last_owner) or ''
    local reason = 'interrupted: its run' .. where .. ' was cut off, and a ' ..
      (redis.call('HGET', task_key, 'type') or 'task') .. ' is not run twice without a probe'
    end_here('failed', given_up_rule, {'error', reason, 'message', 'interrupted'})
    return {'interrupted', 'failed'}
  end

  if limit >= 0 and redis.call('HLEN', busy_key) >= limit then
    -- Count only workers that still hold their task's lease; drop the others' entries.
    local lease_prefix = string.match(lease_key, '^(.*}:lease:)')
    local flat = redis.call('HGETALL', busy_key)
    local running = 0
    for i = 1, #flat, 2 do
      local task_id = string.match(flat[i + 1], '^(%S+)')
      if flat[i] ~= owner and task_id and redis.call('GET', lease_prefix .. task_id) == flat[i] then
        running = running + 1
      else
        redis.call('HDEL', busy_key, flat[i])
      end
    end
    if running >= limit then
      return {'full', running}
    end
  end

  local t = now()
  local changed = false
  local fields = {'status', 'running', 'owner', owner, 'started_at', t, 'updated_at', t, 'progress', '0',
    'message', interrupted and 'resumed after an interrupted run' or ''}
  if instance ~= '' and running_rule ~= 'keep' then
    if status == 'pending' then
      fields[#fields + 1] = 'instance_before'
      fields[#fields + 1] = redis.call('HGET', instances_key, instance) or ''
    end
    redis.call('HSET', instances_key, instance, running_rule)
    changed = true
  end

  local names = {}
  for name in string.gmatch(known[7] or '', '[^,]+') do
    names[#names + 1] = name
  end
  names[#names + 1] = owner
  while #names > WORKERS_KEPT do
    table.remove(names, 1)
  end

  local attempts = (tonumber(known[8]) or 0) + 1
  fields[#fields + 1] = 'workers'
  fields[#fields + 1] = table.concat(names, ',')
  fields[#fields + 1] = 'attempts'
  fields[#fields + 1] = tostring(attempts)
  fields[#fields + 1] = 'version'
  fields[#fields + 1] = tostring((tonumber(known[9]) or 0) + 1)
  if known[5] or known[6] then
    redis.call('HDEL', task_key, 'retry_at', 'interrupted')
  end
  redis.call('HSET', task_key, unpack(fields))
  redis.call('SET', lease_key, owner, 'PX', lease_ms)
  redis.call('HSET', busy_key, owner, (known[11] or '') .. ' ' .. t)
  emit(task_key, events_key, maxlen, changed and running_rule or instance_status(instances_key, instance), changed)
  local retries = known[10] or '0'
  if interrupted and on_interrupt == 'probe' then
    return {'probe', attempts, retries}
  end
  return {'ok', attempts, retries}
end
