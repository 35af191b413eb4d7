#!/usr/bin/env bash
# A taskvisor producer with redis-cli: submit a task, follow it, cancel it, and change
# a provider's concurrency. Needs bash, redis-cli 7.0 or newer (for --json) and jq.
#
#   producer.sh submit PROVIDER TYPE --user ID [--instance ID] [--id ID] [--timeout S] [--data JSON]
#   producer.sh follow PROVIDER TASK_ID [--wait SECONDS]
#   producer.sh cancel PROVIDER TASK_ID [--user ID] [--reason TEXT]
#   producer.sh concurrency PROVIDER N
#
# Every command takes --redis-url URL (else TASKVISOR_REDIS_URL, else
# redis://127.0.0.1:6379/0) and --prefix PREFIX (else TASKVISOR_PREFIX, else taskvisor).
# Exit codes: 0 done, 1 invalid input or a rejected request, 2 a wait ran out.
set -euo pipefail

redis_url=${TASKVISOR_REDIS_URL:-redis://127.0.0.1:6379/0}
prefix=${TASKVISOR_PREFIX:-taskvisor}
user="" instance="" id="" timeout="" data="" reason="" wait=60
positionals=()
while [ $# -gt 0 ]; do
    case "$1" in
        --redis-url|--prefix|--user|--instance|--id|--timeout|--data|--reason|--wait)
            [ $# -ge 2 ] || { echo "error: option $1 needs a value" >&2; exit 1; }
            name=${1#--}
            name=${name//-/_}
            printf -v "$name" '%s' "$2"
            shift 2 ;;
        --*) echo "error: unknown option $1" >&2; exit 1 ;;
        *) positionals+=("$1"); shift ;;
    esac
done
if [ ${#positionals[@]} -ne 3 ]; then
    echo "error: usage: producer.sh submit|follow|cancel|concurrency PROVIDER ARG [options]; see the head of this file" >&2
    exit 1
fi
command=${positionals[0]} provider=${positionals[1]} arg=${positionals[2]}

# The braces around the provider are a Redis Cluster hash tag, part of every key name.
tasks_key="$prefix:{$provider}:tasks"
task_key="$prefix:{$provider}:task:"
events_key="$prefix:{$provider}:events"
settings_key="$prefix:{$provider}:settings"

rcli() {
    redis-cli -u "$redis_url" "$@"
}

fail() {
    echo "error: $*" >&2
    exit 1
}

# Exit with an error naming the first field that breaks the contract, before the XADD.
check_task() {
    local type=$1
    [[ $provider =~ ^[A-Za-z0-9._-]{1,64}$ ]] || fail "provider '$provider' is invalid: expected 1-64 characters of A-Za-z0-9._-"
    case "$type" in
        create|start|stop|restart|delete|reset|reset-password) ;;
        *) fail "field 'type' has invalid value '$type': expected one of create, start, stop, restart, delete, reset, reset-password" ;;
    esac
    [ -n "$instance" ] || [ "$type" = create ] || fail "field 'instance' is missing"
    [ -z "$instance" ] || [[ $instance =~ ^[A-Za-z0-9._:@-]{1,128}$ ]] || fail "field 'instance' has invalid value '$instance'"
    [ -n "$user" ] || fail "field 'user' is missing"
    [[ $user =~ ^[A-Za-z0-9._:@-]{1,128}$ ]] || fail "field 'user' has invalid value '$user'"
    [ -z "$id" ] || [[ $id =~ ^[A-Za-z0-9._:-]{1,64}$ ]] || fail "field 'id' has invalid value '$id'"
    if [ -n "$timeout" ]; then
        [[ $timeout =~ ^[0-9]{1,9}(\.[0-9]{1,6})?$ ]] \
            && awk -v t="$timeout" 'BEGIN { exit !(t > 0 && t <= 604800) }' \
            || fail "field 'timeout' has invalid value '$timeout': expected seconds in plain decimal notation, above 0 and at most 604800"
    fi
    if [ -n "$data" ]; then
        [ "$(printf '%s' "$data" | wc -c)" -le 65536 ] || fail "field 'data' is larger than the limit of 65536 bytes"
        jq -e 'type == "object"' <<<"$data" >/dev/null 2>&1 || fail "field 'data' must be a JSON object"
    fi
}

submit() {
    local type=$1
    check_task "$type"
    local fields=(v 1 type "$type" user "$user")
    [ -z "$id" ] || fields+=(id "$id")
    [ -z "$instance" ] || fields+=(instance "$instance")
    [ -z "$timeout" ] || fields+=(timeout "$timeout")
    [ -z "$data" ] || fields+=(data "$data")
    local entry_id
    entry_id=$(rcli XADD "$tasks_key" '*' "${fields[@]}")
    # Without an id field, the task id is derived from the stream entry id.
    echo "${id:-$provider:$entry_id}"
}

# Print one tab-separated line per event of an XREAD reply read from stdin: entry id,
# task id, version, status, and the text that follow prints. Each event's fields
# arrive as a flat [name, value, ...] list.
event_lines() {
    jq -r '
        .[][] | .[0] as $entry | .[1]
        | [range(0; length; 2) as $i | {(.[$i]): .[$i + 1]}] | add
        | [$entry, .id, .version, .status,
           ("\(.status) \(.progress) \(if .message != "" then .message else .error end)" | rtrimstr(" ") | gsub("\n"; " "))]
        | @tsv'
}

# Print "status progress message" for the task's current state, then for each change,
# until it ends. Every change raises the task's version, so an event whose version
# was already shown is skipped.
follow() {
    local task_id=$1 position version=0 current status
    local deadline=$((SECONDS + ${wait%.*}))

    # Take the newest event id before reading the hash, so that no change is missed.
    position=$(rcli --json XREVRANGE "$events_key" + - COUNT 1 | jq -r '.[0][0] // "0-0"')
    current=$(rcli --json HGETALL "$task_key$task_id")
    status=$(jq -r '.status // empty' <<<"$current")
    if [ -n "$status" ]; then
        jq -r '"\(.status) \(.progress) \(if .message != "" then .message else .error end)" | rtrimstr(" ")' <<<"$current"
        version=$(jq -r '.version' <<<"$current")
        case "$status" in completed|failed|timeout|cancelled) return 0 ;; esac
    fi

    local reply entry event_id event_version event_status line
    while [ "$SECONDS" -lt "$deadline" ]; do
        reply=$(rcli --json XREAD COUNT 100 BLOCK 2000 STREAMS "$events_key" "$position")
        [ "$reply" != null ] || continue
        while IFS=$'\t' read -r entry event_id event_version event_status line; do
            position=$entry
            [ "$event_id" = "$task_id" ] && [ "$event_version" -gt "$version" ] || continue
            version=$event_version
            echo "$line"
            case "$event_status" in completed|failed|timeout|cancelled) return 0 ;; esac
        done < <(event_lines <<<"$reply")
    done

    echo "task $task_id did not end within $wait s" >&2
    return 2
}

# Store the cancel request in the task's hash, then announce it. The supervisor deletes
# the request fields when it applies the request, and writes cancel_error when it
# rejects it.
cancel() {
    local task_id=$1 task attempt
    rcli HSET "$task_key$task_id" cancel_request_user "${user:-*}" cancel_request_reason "$reason" >/dev/null
    rcli PUBLISH "$prefix:cancel" "$provider $task_id" >/dev/null
    for attempt in $(seq 100); do
        task=$(rcli --json HGETALL "$task_key$task_id")
        if [ "$(jq -r 'has("cancel_request_user")' <<<"$task")" = false ]; then
            if [ -n "$(jq -r '.cancel_error // empty' <<<"$task")" ]; then
                echo "cancel rejected: $(jq -r '.cancel_error' <<<"$task")" >&2
                return 1
            fi
            echo "$task_id $(jq -r '.status' <<<"$task")"
            return 0
        fi
        if [ -z "$(jq -r '.status // empty' <<<"$task")" ]; then
            echo "$task_id is not registered yet; the request is stored and applies when it is"
            return 0
        fi
        sleep 0.05
    done
    echo "cancel request for $task_id not applied within 5 s; it stays stored" >&2
    return 2
}

# Write the provider settings hash, whose values are JSON text, then announce the change.
concurrency() {
    local count=$1 allow=false
    [[ $count =~ ^[0-9]+$ ]] && [ "$count" -ge 1 ] && [ "$count" -le 256 ] \
        || fail "concurrency must be a whole number from 1 to 256, got '$count'"
    [ "$count" -eq 1 ] || allow=true
    rcli HSET "$settings_key" allowConcurrentTasks "$allow" maxConcurrentTasks "$count" >/dev/null
    rcli PUBLISH "$prefix:config" "$provider" >/dev/null
    echo "$provider: maxConcurrentTasks=$count"
}

case "$command" in
    submit|follow|cancel|concurrency) "$command" "$arg" ;;
    *) fail "unknown command '$command': expected submit, follow, cancel or concurrency" ;;
esac
