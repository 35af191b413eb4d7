-- Deliver the next new entry of a task stream to one consumer and, in the same atomic
-- step, append it to its instance's queue. Delivery and queueing happen together,
-- so every instance queue keeps its entries in stream order. A task can start only
-- when it is the first entry of its queue.
-- KEYS: task stream.  ARGV: consumer group, consumer, instance queue key prefix.
-- Returns {'entry', id, fields} or {'none', id of the newest entry, or '0-0'}.
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if not reply or not reply[1] or #reply[1][2] == 0 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  return {'none', newest and newest[1] or '0-0'}
end
local entry = reply[1][2][1]
local fields = entry[2]
for i = 1, #fields, 2 do
  if fields[i] == 'instance' and fields[i + 1] ~= '' and #fields[i + 1] <= 128 then
    redis.call('ZADD', ARGV[3] .. fields[i + 1], 0, queue_member(entry[1]))
  end
end
return {'entry', entry[1], fields}
