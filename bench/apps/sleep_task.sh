#!/bin/sh
# The command of the cancel measurement's taskvisor provider: record this process's pid
# and start time in $BENCH_PID_DIR/<task id>.pid, then become `sleep 30`, so the
# recorded pid is the sleep itself.
set -eu
file="$BENCH_PID_DIR/$TASKVISOR_TASK_ID.pid"
echo "$$ $(date +%s.%N)" > "$file.tmp"
mv "$file.tmp" "$file"
exec sleep 30
