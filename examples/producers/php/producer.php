<?php
// A taskvisor producer with phpredis: submit a task, follow it, cancel it, and change
// a provider's concurrency. Needs PHP 8 with the redis extension (Debian: php-cli
// php-redis).
//
//   php producer.php submit PROVIDER TYPE --user ID [--instance ID] [--id ID] [--timeout S] [--data JSON]
//   php producer.php follow PROVIDER TASK_ID [--wait SECONDS]
//   php producer.php cancel PROVIDER TASK_ID [--user ID] [--reason TEXT]
//   php producer.php concurrency PROVIDER N
//
// Every command takes --redis-url URL (else TASKVISOR_REDIS_URL, else
// redis://127.0.0.1:6379/0) and --prefix PREFIX (else TASKVISOR_PREFIX, else taskvisor).
// Exit codes: 0 done, 1 invalid input or a rejected request, 2 a wait ran out.

declare(strict_types=1);

const DEFAULT_REDIS_URL = 'redis://127.0.0.1:6379/0';
const PROTOCOL_VERSION = '1';
const TASK_TYPES = ['create', 'start', 'stop', 'restart', 'delete', 'reset', 'reset-password'];
const FINAL_STATUSES = ['completed', 'failed', 'timeout', 'cancelled'];
const MAX_DATA_BYTES = 65536;
const MAX_TIMEOUT_SECONDS = 7 * 24 * 3600;

/** Split argv into `--name value` options and positional arguments. */
function parse_arguments(array $argv): array
{
    $options = [];
    $positionals = [];
    for ($i = 1; $i < count($argv); $i++) {
        if (str_starts_with($argv[$i], '--')) {
            if (!array_key_exists($i + 1, $argv)) {
                throw new InvalidArgumentException("option {$argv[$i]} needs a value");
            }
            $options[substr($argv[$i], 2)] = $argv[++$i];
        } else {
            $positionals[] = $argv[$i];
        }
    }
    return [$options, $positionals];
}

/** Connect to a redis://[user:password@]host[:port][/db] URL. */
function connect(string $url): Redis
{
    $parts = parse_url($url);
    if ($parts === false || ($parts['scheme'] ?? '') !== 'redis' || !isset($parts['host'])) {
        throw new InvalidArgumentException("invalid Redis URL '$url': expected redis://host:port/db");
    }
    $redis = new Redis();
    try {
        // A read timeout longer than the 5 s of a blocking XREAD.
        $redis->connect($parts['host'], $parts['port'] ?? 6379, 5.0, null, 0, 10.0);
    } catch (RedisException $error) {
        throw new RedisException("cannot connect to Redis at {$parts['host']}:" . ($parts['port'] ?? 6379) . ": {$error->getMessage()}");
    }
    if (isset($parts['pass'])) {
        $redis->auth(isset($parts['user']) && $parts['user'] !== '' ? [$parts['user'], $parts['pass']] : $parts['pass']);
    }
    $redis->select((int) ltrim($parts['path'] ?? '/0', '/'));
    return $redis;
}

function keys(string $prefix, string $provider): array
{
    return [
        'tasks' => "$prefix:{{$provider}}:tasks",
        'task' => "$prefix:{{$provider}}:task:",
        'events' => "$prefix:{{$provider}}:events",
        'settings' => "$prefix:{{$provider}}:settings",
        'cancel' => "$prefix:cancel",
        'config' => "$prefix:config",
    ];
}

/** Throw an exception naming the first field that breaks the contract, before the XADD. */
function check_task(string $provider, array $fields): void
{
    if (!preg_match('/^[A-Za-z0-9._-]{1,64}$/', $provider)) {
        throw new InvalidArgumentException("provider '$provider' is invalid: expected 1-64 characters of A-Za-z0-9._-");
    }
    if (!in_array($fields['type'], TASK_TYPES, true)) {
        throw new InvalidArgumentException("field 'type' has invalid value '{$fields['type']}': expected one of " . implode(', ', TASK_TYPES));
    }
    $rules = [
        ['id', '/^[A-Za-z0-9._:-]{1,64}$/', false],
        ['instance', '/^[A-Za-z0-9._:@-]{1,128}$/', $fields['type'] !== 'create'],
        ['user', '/^[A-Za-z0-9._:@-]{1,128}$/', true],
    ];
    foreach ($rules as [$name, $pattern, $required]) {
        $value = $fields[$name] ?? '';
        if ($value === '' && $required) {
            throw new InvalidArgumentException("field '$name' is missing");
        }
        if ($value !== '' && !preg_match($pattern, $value)) {
            throw new InvalidArgumentException("field '$name' has invalid value '$value': expected $pattern");
        }
    }
    $timeout = $fields['timeout'] ?? '';
    if ($timeout !== '' && (!preg_match('/^[0-9]{1,9}(\.[0-9]{1,6})?$/', $timeout)
            || (float) $timeout <= 0 || (float) $timeout > MAX_TIMEOUT_SECONDS)) {
        throw new InvalidArgumentException("field 'timeout' has invalid value '$timeout': expected seconds in plain decimal notation, above 0 and at most " . MAX_TIMEOUT_SECONDS);
    }
    $data = $fields['data'] ?? '';
    if ($data !== '') {
        if (strlen($data) > MAX_DATA_BYTES) {
            throw new InvalidArgumentException("field 'data' is larger than the limit of " . MAX_DATA_BYTES . " bytes");
        }
        // Decoded as objects, so that `{}` and `[]` stay apart.
        $value = json_decode($data, false);
        if (json_last_error() !== JSON_ERROR_NONE) {
            throw new InvalidArgumentException("field 'data' is not valid JSON: " . json_last_error_msg());
        }
        if (!is_object($value)) {
            throw new InvalidArgumentException("field 'data' must be a JSON object");
        }
    }
}

function submit(Redis $redis, array $options, string $provider, string $type): int
{
    $fields = ['v' => PROTOCOL_VERSION, 'type' => $type, 'user' => $options['user'] ?? ''];
    foreach (['id', 'instance', 'timeout', 'data'] as $name) {
        if (($options[$name] ?? '') !== '') {
            $fields[$name] = $options[$name];
        }
    }
    check_task($provider, $fields);
    $entryId = $redis->xAdd(keys($options['prefix'], $provider)['tasks'], '*', $fields);
    // Without an id field, the task id is derived from the stream entry id.
    echo ($fields['id'] ?? "$provider:$entryId"), "\n";
    return 0;
}

function show(array $task): void
{
    $text = ($task['message'] ?? '') !== '' ? $task['message'] : ($task['error'] ?? '');
    echo rtrim("{$task['status']} {$task['progress']} $text"), "\n";
}

/**
 * Print the task's current state, then each change, until it ends. Every change
 * raises the task's version, so an event whose version was already shown is skipped.
 */
function follow(Redis $redis, array $options, string $provider, string $taskId): int
{
    $keyNames = keys($options['prefix'], $provider);
    $deadline = microtime(true) + (float) ($options['wait'] ?? 60);
    // Take the newest event id before reading the hash, so that no change is missed.
    $newest = $redis->xRevRange($keyNames['events'], '+', '-', 1);
    $position = $newest ? array_key_first($newest) : '0-0';
    $version = 0;
    $current = $redis->hGetAll($keyNames['task'] . $taskId);
    if (isset($current['status'])) {
        show($current);
        $version = (int) $current['version'];
        if (in_array($current['status'], FINAL_STATUSES, true)) {
            return 0;
        }
    }
    while (microtime(true) < $deadline) {
        $block = max(1, (int) min(5000, ($deadline - microtime(true)) * 1000));
        $reply = $redis->xRead([$keyNames['events'] => $position], 100, $block);
        foreach ($reply ?: [] as $entries) {
            foreach ($entries as $id => $event) {
                $position = $id;
                if (($event['id'] ?? '') !== $taskId || (int) $event['version'] <= $version) {
                    continue;
                }
                $version = (int) $event['version'];
                show($event);
                if (in_array($event['status'], FINAL_STATUSES, true)) {
                    return 0;
                }
            }
        }
    }
    fwrite(STDERR, "task $taskId did not end within {$options['wait']} s\n");
    return 2;
}

/**
 * Store the cancel request in the task's hash, then announce it. The supervisor
 * deletes the request fields when it applies the request, and writes cancel_error
 * when it rejects it.
 */
function cancel(Redis $redis, array $options, string $provider, string $taskId): int
{
    $keyNames = keys($options['prefix'], $provider);
    $redis->hMSet($keyNames['task'] . $taskId, [
        'cancel_request_user' => ($options['user'] ?? '') !== '' ? $options['user'] : '*',
        'cancel_request_reason' => $options['reason'] ?? '',
    ]);
    $redis->publish($keyNames['cancel'], "$provider $taskId");
    $deadline = microtime(true) + 5;
    while (microtime(true) < $deadline) {
        $task = $redis->hGetAll($keyNames['task'] . $taskId);
        if (!isset($task['cancel_request_user'])) {
            if (($task['cancel_error'] ?? '') !== '') {
                fwrite(STDERR, "cancel rejected: {$task['cancel_error']}\n");
                return 1;
            }
            echo "$taskId {$task['status']}\n";
            return 0;
        }
        if (!isset($task['status'])) {
            echo "$taskId is not registered yet; the request is stored and applies when it is\n";
            return 0;
        }
        usleep(50000);
    }
    fwrite(STDERR, "cancel request for $taskId not applied within 5 s; it stays stored\n");
    return 2;
}

/** Write the provider settings hash (JSON values), then announce the change. */
function concurrency(Redis $redis, array $options, string $provider, string $count): int
{
    if (!preg_match('/^[0-9]+$/', $count) || (int) $count < 1 || (int) $count > 256) {
        throw new InvalidArgumentException("concurrency must be a whole number from 1 to 256, got '$count'");
    }
    $keyNames = keys($options['prefix'], $provider);
    $redis->hMSet($keyNames['settings'], [
        'allowConcurrentTasks' => json_encode((int) $count > 1),
        'maxConcurrentTasks' => json_encode((int) $count),
    ]);
    $redis->publish($keyNames['config'], $provider);
    echo "$provider: maxConcurrentTasks=$count\n";
    return 0;
}

function main(array $argv): int
{
    [$options, $positionals] = parse_arguments($argv);
    [$command, $provider, $arg] = $positionals + [null, null, null];
    $commands = ['submit', 'follow', 'cancel', 'concurrency'];
    if (!in_array($command, $commands, true) || $provider === null || $arg === null) {
        throw new InvalidArgumentException('usage: producer.php submit|follow|cancel|concurrency PROVIDER ARG [options]; see the head of this file');
    }
    $options['prefix'] ??= getenv('TASKVISOR_PREFIX') ?: 'taskvisor';
    $redis = connect($options['redis-url'] ?? (getenv('TASKVISOR_REDIS_URL') ?: DEFAULT_REDIS_URL));
    try {
        return $command($redis, $options, $provider, $arg);
    } finally {
        $redis->close();
    }
}

try {
    exit(main($argv));
} catch (InvalidArgumentException | RedisException $error) {
    fwrite(STDERR, "error: {$error->getMessage()}\n");
    exit(1);
}
