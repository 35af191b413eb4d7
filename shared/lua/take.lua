-- Deliver the next new entry of a task stream to one consumer and, in the same atomic
-- step, append it to its instance's queue. Delivery and queueing happen together,
-- so every instance queue keeps its entries in stream order. A task can start only
-- when it is the first entry of its queue.
-- With ARGV 4, the entry's task is also started for the consumer in the same step when
-- the intake has registered it, which saves the worker a round trip per task.
-- KEYS: task stream.
-- ARGV: consumer group, consumer, instance queue key prefix, and '' or a JSON object
--       with the start arguments: prefix (the provider's key prefix `<prefix>:{<p>}:`),
--       provider, owner, lease_ms, maxlen, poison, limit, dead_maxlen, and types, a
--       mapping of task type to {running rule, cancel rule, given-up rule, on-interrupt}.
-- Returns {'entry', id, fields} or {'none', id of the newest entry, or '0-0'}; with a
-- start, {'entry', id, fields, start_task's reply...}.
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if not reply or not reply[1] or #reply[1][2] == 0 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
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
  redis.call('ZADD', ARGV[3] .. instance, 0, queue_member(entry[1]))
end
if not ARGV[4] or ARGV[4] == '' then
  return {'entry', entry[1], fields}
end

local spec = cjson.decode(ARGV[4])
local rules = spec.types[task_type]
if task_id == '' then
  task_id = spec.provider .. ':' .. entry[1]
end
if not rules or #task_id > 64 or #instance > 128 then
  return {'entry', entry[1], fields}
end
local p = spec.prefix
local keys = {p .. 'task:' .. task_id, p .. 'events', p .. 'instances', p .. 'lease:' .. task_id, KEYS[1],
  ARGV[3] .. instance, p .. 'busy', p .. 'dead', p .. 'limit'}
local args = {tostring(spec.maxlen), spec.owner, tostring(spec.lease_ms), rules[1], rules[2], ARGV[1], entry[1],
  'registered', rules[4], tostring(spec.poison), tostring(spec.limit), rules[3], tostring(spec.dead_maxlen)}
local started = start_task(keys, args)
local result = {'entry', entry[1], fields}
for i = 1, #started do
  result[#result + 1] = started[i]
end
return result
