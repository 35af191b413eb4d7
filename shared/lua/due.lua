-- Hand the first automatic retry that is due to one consumer.
-- KEYS: retry schedule (sorted set of entry ids by due time in milliseconds), task stream.
-- ARGV: consumer group, consumer.
-- Returns {'entry', id, fields}, {'gone'} when the due entry no longer exists (its task
-- was cancelled while it waited), or {'none', due time of the next retry in ms or ''}.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, 1)[1]
if not due then
  local next_one = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'none', next_one[2] or ''}
end
redis.call('ZREM', KEYS[1], due)
local claimed = redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, due)
if claimed[1] and claimed[1][2] then
  return {'entry', claimed[1][1], claimed[1][2]}
end
return {'gone'}
