#!/usr/bin/env node
// A taskvisor producer with node-redis: submit a task, follow it, cancel it, and
// change a provider's concurrency.
//
//   node producer.mjs submit PROVIDER TYPE --user ID [--instance ID] [--id ID] [--timeout S] [--data JSON]
//   node producer.mjs follow PROVIDER TASK_ID [--wait SECONDS]
//   node producer.mjs cancel PROVIDER TASK_ID [--user ID] [--reason TEXT]
//   node producer.mjs concurrency PROVIDER N
//
// Every command takes --redis-url URL (else TASKVISOR_REDIS_URL, else
// redis://127.0.0.1:6379/0) and --prefix PREFIX (else TASKVISOR_PREFIX, else taskvisor).
// Exit codes: 0 done, 1 invalid input or a rejected request, 2 a wait ran out.

import { parseArgs } from 'node:util';
import { FINAL_STATUSES, PROTOCOL_VERSION, checkTask, connect, keys, newestEventId } from './taskvisor.mjs';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'redis-url': { type: 'string' },
    prefix: { type: 'string', default: process.env.TASKVISOR_PREFIX || 'taskvisor' },
    user: { type: 'string' },
    instance: { type: 'string' },
    id: { type: 'string' },
    timeout: { type: 'string' },
    data: { type: 'string' },
    reason: { type: 'string', default: '' },
    wait: { type: 'string', default: '60' },
  },
});

async function submit(client, provider, type) {
  const fields = { v: PROTOCOL_VERSION, type, user: options.user ?? '' };
  for (const name of ['id', 'instance', 'timeout', 'data']) {
    if (options[name]) fields[name] = options[name];
  }
  checkTask(provider, fields);
  const entryId = await client.xAdd(keys(options.prefix, provider).tasks, '*', fields);
  // Without an id field, the task id is derived from the stream entry id.
  console.log(fields.id || `${provider}:${entryId}`);
}

function show(task) {
  console.log(`${task.status} ${task.progress} ${task.message || task.error || ''}`.trimEnd());
}

// Prints the task's current state, then each change, until it ends. Every change
// raises the task's version, so an event whose version was already shown is skipped.
async function follow(client, provider, taskId) {
  const keyNames = keys(options.prefix, provider);
  const deadline = Date.now() + Number(options.wait) * 1000;
  let position = await newestEventId(client, keyNames.events);
  let version = 0;
  const current = await client.hGetAll(keyNames.task(taskId));
  if (current.status) {
    show(current);
    version = Number(current.version);
    if (FINAL_STATUSES.has(current.status)) return 0;
  }
  while (Date.now() < deadline) {
    const block = Math.max(1, Math.min(5000, deadline - Date.now()));
    const reply = await client.xRead({ key: keyNames.events, id: position }, { COUNT: 100, BLOCK: block });
    for (const stream of reply ?? []) {
      for (const { id, message: event } of stream.messages) {
        position = id;
        if (event.id !== taskId || Number(event.version) <= version) continue;
        version = Number(event.version);
        show(event);
        if (FINAL_STATUSES.has(event.status)) return 0;
      }
    }
  }
  console.error(`task ${taskId} did not end within ${options.wait} s`);
  return 2;
}

// Stores the cancel request in the task's hash, then announces it. The supervisor
// deletes the request fields when it applies the request, and writes cancel_error
// when it rejects it.
async function cancel(client, provider, taskId) {
  const keyNames = keys(options.prefix, provider);
  await client.hSet(keyNames.task(taskId), {
    cancel_request_user: options.user || '*',
    cancel_request_reason: options.reason,
  });
  await client.publish(keyNames.cancelChannel, `${provider} ${taskId}`);
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    const task = await client.hGetAll(keyNames.task(taskId));
    if (!('cancel_request_user' in task)) {
      if (task.cancel_error) {
        console.error(`cancel rejected: ${task.cancel_error}`);
        return 1;
      }
      console.log(`${taskId} ${task.status}`);
      return 0;
    }
    if (!task.status) {
      console.log(`${taskId} is not registered yet; the request is stored and applies when it is`);
      return 0;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  console.error(`cancel request for ${taskId} not applied within 5 s; it stays stored`);
  return 2;
}

// Writes the provider settings hash (JSON values), then announces the change.
async function concurrency(client, provider, count) {
  if (!/^[0-9]+$/.test(count) || Number(count) < 1 || Number(count) > 256) {
    throw new Error(`concurrency must be a whole number from 1 to 256, got '${count}'`);
  }
  const keyNames = keys(options.prefix, provider);
  await client.hSet(keyNames.settings, {
    allowConcurrentTasks: JSON.stringify(Number(count) > 1),
    maxConcurrentTasks: JSON.stringify(Number(count)),
  });
  await client.publish(keyNames.configChannel, provider);
  console.log(`${provider}: maxConcurrentTasks=${count}`);
}

async function main() {
  const [command, provider, arg] = positionals;
  const commands = {
    submit: () => submit(client, provider, arg),
    follow: () => follow(client, provider, arg),
    cancel: () => cancel(client, provider, arg),
    concurrency: () => concurrency(client, provider, arg),
  };
  if (!commands[command] || !provider || !arg) {
    throw new Error('usage: producer.mjs submit|follow|cancel|concurrency PROVIDER ARG [options]; see the head of this file');
  }
  const client = await connect(options['redis-url']);
  try {
    return (await commands[command]()) ?? 0;
  } finally {
    await client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(`error: ${error.message}`);
    process.exit(1);
  },
);
