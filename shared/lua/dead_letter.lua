-- Move a rejected entry to the dead-letter stream, then acknowledge and delete it, and
-- drop it from its instance queue so that it holds up no later task.
-- KEYS: dead-letter stream, task stream, instance queue (may be a key that does not exist).
-- ARGV: dead maxlen, consumer group, entry id, reason, entry fields as JSON.
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'entry', ARGV[3], 'reason', ARGV[4],
  'fields', ARGV[5], 'at', now())
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], queue_member(ARGV[3]))
return 1
