-- Deliver the next new entry of a task stream to one consumer; see take_entry.lua.
-- KEYS: task stream.
-- ARGV: consumer group, consumer, instance queue key prefix, then optionally the start
--       arguments that take_entry.lua lists.
return take_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV, 4)
