#!/usr/bin/env node
// A consumer of a provider's taskvisor event stream with node-redis. It prints one
// JSON line per state change, in the order the changes happened:
//
//   {"event":"1796416300114-1","id":"task-1001","version":2,"status":"running","progress":0,"message":"","instance_status":"starting"}
//
//   node events.mjs PROVIDER [TASK_ID...] [--from ENTRY_ID] [--wait SECONDS]
//
// Without --from it starts after the newest event, and prints `listening after
// <entry id>` on stderr once it has taken that position. With task ids it prints only
// their events and exits once each of them has ended. --wait (default 600) ends it
// with exit code 2 when that time has passed. --redis-url and --prefix work as in
// producer.mjs. A panel that must not lose its place across restarts would use a
// consumer group of its own instead (XREADGROUP and XACK; see docs/producers.md).

import { parseArgs } from 'node:util';
import { FINAL_STATUSES, connect, keys, newestEventId } from './taskvisor.mjs';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'redis-url': { type: 'string' },
    prefix: { type: 'string', default: process.env.TASKVISOR_PREFIX || 'taskvisor' },
    from: { type: 'string' },
    wait: { type: 'string', default: '600' },
  },
});

async function main() {
  const [provider, ...taskIds] = positionals;
  if (!provider) {
    throw new Error('usage: events.mjs PROVIDER [TASK_ID...] [--from ENTRY_ID] [--wait SECONDS]');
  }
  const eventsKey = keys(options.prefix, provider).events;
  const open = new Set(taskIds);
  const client = await connect(options['redis-url']);
  try {
    let position = options.from ?? (await newestEventId(client, eventsKey));
    console.error(`listening after ${position}`);
    const deadline = Date.now() + Number(options.wait) * 1000;
    while (Date.now() < deadline) {
      const block = Math.max(1, Math.min(5000, deadline - Date.now()));
      const reply = await client.xRead({ key: eventsKey, id: position }, { COUNT: 100, BLOCK: block });
      for (const stream of reply ?? []) {
        for (const { id, message: event } of stream.messages) {
          position = id;
          if (taskIds.length && !taskIds.includes(event.id)) continue;
          console.log(JSON.stringify({
            event: id,
            id: event.id,
            version: Number(event.version),
            status: event.status,
            progress: Number(event.progress),
            message: event.message || event.error || '',
            instance_status: event.instance_status,
          }));
          if (FINAL_STATUSES.has(event.status)) open.delete(event.id);
        }
      }
      if (taskIds.length && open.size === 0) return 0;
    }
    console.error(`stopped after ${options.wait} s; still open: ${[...open].join(' ') || 'none'}`);
    return 2;
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
