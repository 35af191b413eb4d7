"""The intake process: makes every new task visible as pending at once.

Workers take entries only when they are free, so without the intake a task pushed
while every worker is busy would have no status until a worker reached it. The
intake follows each provider's task stream with plain XREAD (no consumer group) and
registers each valid entry as pending. On one Redis server a single blocking XREAD
covers every stream. A Redis Cluster rejects a command over keys of several slots,
so there each stream is read on its own. That step is idempotent, so the intake starts
from the beginning of each stream after a restart: finished entries are deleted, and
what is left is exactly the work still to be done. Invalid entries are left to the
workers, which move them to the dead-letter stream.
"""

import logging
import os
import time

import redis

from shared import heartbeat
from shared.errors import InvalidEntry
from shared.keys import Keys
from shared.process import stop_on_sigterm
from shared.redaction import Redactor
from shared.redis_client import connect, is_cluster
from shared.schema import TaskSpec, parse_entry
from shared.settings import Config
from shared.taskstate import TaskState
from supervisor.reconcile import Reconciler

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500
READ_COUNT = 500
# After a read that returned fewer than READ_COUNT entries, seconds to wait before the
# next one, so that entries arriving at a high rate are registered in batches of one
# pipeline each. A task registered this much later is still pending within a second.
BATCH_PAUSE_SECONDS = 0.02
# Seconds an intake on a Redis Cluster waits after a pass that found no new entry.
CLUSTER_IDLE_SECONDS = 0.1


class Intake:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self.streams = {self.keys.tasks(provider): provider for provider in config.providers}
        self.positions = {stream: "0-0" for stream in self.streams}
        self.stopping = False

    def run(self) -> int:
        stop_on_sigterm(self)
        self.client = connect(self.config.redis.url)
        self.cluster = is_cluster(self.client)
        self.state = TaskState(
            self.client,
            self.keys,
            self.config.redis.events_max_len,
            self.config.redis.dead_max_len,
            Redactor(self.config.secret_fields),
        )
        self.reconciler = Reconciler(self.config, self.state)
        log.info("intake started providers=%d pid=%d", len(self.streams), os.getpid())
        backoff = 0.5
        self.pubsub = None
        while not self.stopping:
            heartbeat.beat()
            if not self.streams:
                # No provider yet: stay up, so that the supervisor need not respawn it.
                time.sleep(0.2)
                continue
            try:
                if self.pubsub is None:
                    self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    self.pubsub.subscribe(self.keys.cancel_channel())
                self.apply_cancel_notices()
                read = self.pass_once()
                self.reconciler.run_due(self.config.providers)
                backoff = 0.5
                if 0 < read < READ_COUNT:
                    time.sleep(BATCH_PAUSE_SECONDS)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable in intake retry_in=%.1fs error=%s", backoff, exc)
                self.pubsub = None
                heartbeat.beat(pause=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        log.info("intake stopped pid=%d", os.getpid())
        return 0

    def apply_cancel_notices(self) -> None:
        """Apply cancel requests that producers stored in task hashes and announced."""
        while True:
            message = self.pubsub.get_message(timeout=0)
            if message is None:
                return
            data = message.get("data")
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
            provider, _, task_id = text.strip().partition(" ")
            if provider not in self.config.providers or not task_id:
                log.warning("cancel notice ignored: expected '<provider> <task id>' of a configured provider, got %r", text[:200])
                continue
            reply = self.state.cancel(provider, task_id, stored=True)
            log.info("cancel notice handled task_id=%s provider=%s reply=%s", task_id, provider, " ".join(reply))

    def read_streams(self) -> list:
        """Return the new entries of every task stream as XREAD replies: [stream, [(id, fields), ...]] items."""
        if not self.cluster:
            return self.client.xread(self.positions, count=READ_COUNT, block=READ_BLOCK_MS) or []
        # One blocking read per stream would wait for each stream in turn, so these reads
        # do not block. The pipeline sends them in one round trip per cluster node.
        pipe = self.client.pipeline(transaction=False)
        for stream, position in self.positions.items():
            pipe.xread({stream: position}, count=READ_COUNT)
        reply = [item for result in pipe.execute() for item in result or []]
        if not reply:
            time.sleep(CLUSTER_IDLE_SECONDS)
        return reply

    def pass_once(self) -> int:
        """Register the entries of one read; returns the largest number of entries read from one stream."""
        reply = self.read_streams()
        if not reply:
            return 0
        read = max(len(items) for _stream, items in reply)
        valid: list[tuple[TaskSpec, float]] = []
        for stream_name, items in reply:
            stream = stream_name.decode() if isinstance(stream_name, bytes) else stream_name
            provider = self.streams[stream]
            settings = self.config.providers[provider]
            for entry_bytes, fields in items:
                entry_id = entry_bytes.decode() if isinstance(entry_bytes, bytes) else entry_bytes
                self.positions[stream] = entry_id
                if not fields:
                    continue
                try:
                    spec = parse_entry(provider, entry_id, fields)
                except InvalidEntry:
                    continue
                valid.append((spec, spec.timeout or settings.timeout_for(spec.type)))

        # A duplicate id is left to the workers, which move its entry to the dead-letter stream.
        claimed = self.state.claim_ids([spec for spec, _timeout in valid])
        admitted = [(spec, timeout) for (spec, timeout), ok in zip(valid, claimed, strict=True) if ok]
        if not admitted:
            return read
        statuses = self.state.admit_many(admitted)
        for (spec, _timeout), status in zip(admitted, statuses, strict=True):
            provider, task_id = spec.provider, spec.id
            if status in (b"cancel_requested", "cancel_requested"):
                reply = self.state.cancel(provider, task_id, stored=True)
                log.info("stored cancel request applied task_id=%s provider=%s reply=%s", task_id, provider, reply[0])
        return read


def intake_main(config: Config) -> int:
    return Intake(config).run()
