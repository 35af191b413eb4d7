-- Set an instance left in a transitional status (creating, starting, ...) with no
-- unfinished task to a given status, and record the change in the event stream.
-- KEYS: instance hash, event stream, task stream, the instance's queue.
-- ARGV: events maxlen, provider, instance, new status, then the transitional statuses.
-- Returns the status it had when it was repaired, or '' when it needed no repair.
local current = redis.call('HGET', KEYS[1], ARGV[3])
if not current then
  return ''
end
local transitional = false
for i = 5, #ARGV do
  if ARGV[i] == current then
    transitional = true
  end
end
if not transitional or queue_head(KEYS[4], KEYS[3]) then
  return ''
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
local t = now()
local fields = {'id', '', 'provider', ARGV[2], 'instance', ARGV[3], 'instance_status', ARGV[4],
  'instance_changed', '1', 'updated_at', t, 'message', 'repaired: it was ' .. current .. ' with no unfinished task'}
if ARGV[1] == '0' then
  redis.call('XADD', KEYS[2], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
end
return current
