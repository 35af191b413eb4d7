// Key names and entry checks of the taskvisor producer protocol, version 1
// (docs/protocol.md), shared by producer.mjs and events.mjs.

import { createClient } from 'redis';

export const DEFAULT_REDIS_URL = 'redis://127.0.0.1:6379/0';
export const PROTOCOL_VERSION = '1';
export const TASK_TYPES = ['create', 'start', 'stop', 'restart', 'delete', 'reset', 'reset-password'];
export const FINAL_STATUSES = new Set(['completed', 'failed', 'timeout', 'cancelled']);
export const MAX_DATA_BYTES = 65536;
export const MAX_TIMEOUT_SECONDS = 7 * 24 * 3600;

export function keys(prefix, provider) {
  return {
    tasks: `${prefix}:{${provider}}:tasks`,
    task: (taskId) => `${prefix}:{${provider}}:task:${taskId}`,
    events: `${prefix}:{${provider}}:events`,
    settings: `${prefix}:{${provider}}:settings`,
    cancelChannel: `${prefix}:cancel`,
    configChannel: `${prefix}:config`,
  };
}

// Connects to the URL given with --redis-url, else TASKVISOR_REDIS_URL, else the default.
// A lost connection is tried again 3 times, 0.2 to 0.6 s apart, and then the command
// fails, because node-redis would otherwise retry forever.
export async function connect(url) {
  const client = createClient({
    url: url || process.env.TASKVISOR_REDIS_URL || DEFAULT_REDIS_URL,
    socket: {
      connectTimeout: 5000,
      reconnectStrategy: (retries, cause) => (retries >= 3 ? cause : 200 * (retries + 1)),
    },
  });
  client.on('error', (error) => console.error(`redis error: ${error.message}`));
  await client.connect();
  return client;
}

// Throws an Error that names the first field which breaks the contract, the same
// rule the workers apply, so that a bad task is caught before the XADD.
export function checkTask(provider, fields) {
  const rules = [
    [provider, /^[A-Za-z0-9._-]{1,64}$/, 'provider', true],
    [fields.id, /^[A-Za-z0-9._:-]{1,64}$/, 'id', false],
    [fields.instance, /^[A-Za-z0-9._:@-]{1,128}$/, 'instance', fields.type !== 'create'],
    [fields.user, /^[A-Za-z0-9._:@-]{1,128}$/, 'user', true],
  ];
  if (!TASK_TYPES.includes(fields.type)) {
    throw new Error(`field 'type' has invalid value '${fields.type}': expected one of ${TASK_TYPES.join(', ')}`);
  }
  for (const [value, pattern, name, required] of rules) {
    if (!value) {
      if (required) throw new Error(`field '${name}' is missing`);
    } else if (!pattern.test(value)) {
      throw new Error(`field '${name}' has invalid value '${value}': expected ${pattern.source}`);
    }
  }
  if (fields.timeout) {
    const seconds = Number(fields.timeout);
    if (!/^[0-9]{1,9}(\.[0-9]{1,6})?$/.test(fields.timeout) || seconds <= 0 || seconds > MAX_TIMEOUT_SECONDS) {
      throw new Error(`field 'timeout' has invalid value '${fields.timeout}': expected seconds in plain decimal notation, above 0 and at most ${MAX_TIMEOUT_SECONDS}`);
    }
  }
  if (fields.data) {
    if (Buffer.byteLength(fields.data, 'utf8') > MAX_DATA_BYTES) {
      throw new Error(`field 'data' is larger than the limit of ${MAX_DATA_BYTES} bytes`);
    }
    let value;
    try {
      value = JSON.parse(fields.data);
    } catch (error) {
      throw new Error(`field 'data' is not valid JSON: ${error.message}`);
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw new Error("field 'data' must be a JSON object");
    }
  }
}

// Returns the id of the newest event, or 0-0 for an empty stream. Take it before
// pushing a task or reading its hash, and read the events after it, so that no
// change is missed.
export async function newestEventId(client, eventsKey) {
  const newest = await client.xRevRange(eventsKey, '+', '-', { COUNT: 1 });
  return newest.length ? newest[0].id : '0-0';
}
