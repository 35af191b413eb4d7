-- Extend a lease held by this owner, and mark the stream entry as freshly handled so
-- that no idle worker claims it as abandoned while its task still runs.
-- KEYS: lease key, task stream.  ARGV: owner, lease ms, consumer group, consumer, entry id.
-- Returns 1, or 0 when the lease is gone or held by another worker.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID')
  return 1
end
return 0
