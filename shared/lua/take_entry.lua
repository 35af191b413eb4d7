-- take_entry(stream_key, group, consumer, queue_prefix, args, first): deliver the next new
-- entry of a task stream to one consumer and, in the same atomic step, append it to its
-- instance's queue. Delivery and queueing happen together, so every instance queue
-- keeps its entries in stream order. A task can start only when it is the first entry
-- of its queue.
-- When `args` contains start arguments from index `first` on, the entry's task is also
-- started for the consumer when the intake has registered it, which saves the worker a
-- round trip per task. The start arguments are, in order: the provider's key prefix
-- (`<prefix>:{<p>}:`), provider, owner, lease ms, events maxlen, runs lost before a task
-- is poison, concurrency limit and dead-letter maxlen. The last one is a text with the
-- rules of every task type: `;<type>=<instance status while running>,<after a cancel>,
-- <when given up>,<on-interrupt action>` for each type. One text instead of 35
-- arguments keeps the worker's cost of sending them low, because it sends them with
-- every task.
-- Returns {'entry', id, fields} or {'none', id of the newest entry, or '0-0'}; with a
-- start, {'entry', id, fields, start_task's reply...}.
local START_TYPES_AT = 8

-- Return the four rules of `task_type` from the rules text, or nil for an unknown type.
local function type_rules(rules_text, task_type)
  local at = string.find(rules_text, ';' .. task_type .. '=', 1, true)
  if not at then
    return nil
  end
  local running, cancel, given_up, on_interrupt = string.match(rules_text,
    '^([^,;]*),([^,;]*),([^,;]*),([^,;]*)', at + #task_type + 2)
  if not on_interrupt then
    return nil
  end
  return {running, cancel, given_up, on_interrupt}
end

local function take_entry(stream_key, group, consumer, queue_prefix, args, first)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream_key, '>')
  if not reply or not reply[1] or #reply[1][2] == 0 then
    local newest = redis.call('XREVRANGE', stream_key, '+', '-', 'COUNT', 1)[1]
    return {'none', newest and newest[1] or '0-0'}
  end
  local entry = reply[1][2][1]
  local fields = entry[2]
  local task_id, task_type, instance = '', '', ''
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'instance' then
      instance = fields[i + 1]
    elseif name == 'id' then
      task_id = fields[i + 1]
    elseif name == 'type' then
      task_type = fields[i + 1]
    end
  end
  if instance ~= '' and #instance <= 128 then
    redis.call('ZADD', queue_prefix .. instance, 0, queue_member(entry[1]))
  end
  if not args[first] or args[first] == '' then
    return {'entry', entry[1], fields}
  end

  local rules = type_rules(args[first + START_TYPES_AT], task_type)
  if task_id == '' then
    task_id = args[first + 1] .. ':' .. entry[1]
  end
  if not rules or #task_id > 64 or #instance > 128 then
    return {'entry', entry[1], fields}
  end
  local p = args[first]
  local keys = {p .. 'task:' .. task_id, p .. 'events', p .. 'instances', p .. 'lease:' .. task_id, stream_key,
    queue_prefix .. instance, p .. 'busy', p .. 'dead', p .. 'limit'}
  -- The entry is in its instance's queue already (see start_task.lua).
  keys.queued = instance ~= '' and #instance <= 128
  local start_args = {args[first + 4], args[first + 2], args[first + 3], rules[1], rules[2], group, entry[1],
    'registered', rules[4], args[first + 5], args[first + 6], rules[3], args[first + 7]}
  local started = start_task(keys, start_args)
  local result = {'entry', entry[1], fields}
  for i = 1, #started do
    result[#result + 1] = started[i]
  end
  return result
end
