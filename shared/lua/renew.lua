-- Extend a lease held by this owner.  KEYS: lease key.  ARGV: owner, lease ms.
-- Returns 1, or 0 when the lease is gone or held by another worker.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
