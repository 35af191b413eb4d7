-- Release what a worker known to be dead held, so that its task is taken over at once
-- instead of after its lease runs out: its entry in the busy hash and its task's lease.
-- KEYS: busy hash.  ARGV: owner, lease key prefix (the lease key without the task id).
-- Returns the id of the task whose lease was released, or ''.
local value = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if not value then
  return ''
end
local task_id = string.match(value, '^(%S+)')
if task_id and redis.call('GET', ARGV[2] .. task_id) == ARGV[1] then
  redis.call('DEL', ARGV[2] .. task_id)
  return task_id
end
return ''
