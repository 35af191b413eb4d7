-- Move a task to running for one worker; see start_task.lua for the keys, arguments
-- and replies.
return start_task(KEYS, ARGV)
