#!/bin/sh
# Stand-in for a real provider script, used by the demo providers.
# Arguments: task type, instance id. The task arrives as JSON on stdin.
# It reports progress on stdout, prints a JSON result as its last line,
# and fails for any instance whose id contains "broken".
set -eu
type="$1"
instance="${2:-}"
cat > /dev/null

steps="${DEMO_STEPS:-4}"
step=1
while [ "$step" -le "$steps" ]; do
    sleep "${DEMO_STEP_SECONDS:-0.5}"
    echo "progress $((step * 100 / (steps + 1))) $type step $step of $steps"
    step=$((step + 1))
done

case "$instance" in
    *broken*)
        echo "instance $instance: disk image not found on storage 'local-lvm'" >&2
        exit 2
        ;;
esac

if [ "$type" = "create" ] && [ -z "$instance" ]; then
    instance="vm-$$"
fi
echo "{\"instance\": \"$instance\", \"operation\": \"$type\", \"host\": \"$(hostname)\"}"
