"""The mirror process: copies every task state change from Redis into the SQL store.

It reads all providers' event streams through the `mirror` consumer group, in
batches. Within a batch only the newest state of each task and of each instance is
written, in one transaction, and the events are acknowledged only after the commit.
Writes are versioned, so an event replayed after a crash never moves a row back.
While the database is unreachable the events wait in Redis and the mirror retries.
"""

import logging
import os
import time

import redis

from shared import heartbeat
from shared.errors import StoreError
from shared.keys import MIRROR_GROUP, Keys
from shared.process import stop_on_sigterm
from shared.redis_client import connect, ensure_group
from shared.settings import Config
from shared.store import open_store
from shared.store.records import InstanceRecord, TaskRecord

log = logging.getLogger(__name__)

READ_COUNT = 2000
READ_BLOCK_MS = 200
# Seconds between two looks for event streams of providers the config does not list.
STREAM_REFRESH_SECONDS = 5.0
IDLE_SLEEP_SECONDS = 0.2


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _float_or_none(text: str) -> float | None:
    return float(text) if text else None


def event_position(entry_id: str) -> int:
    """Turn a stream entry id into one integer that keeps the stream's order."""
    millis, _, sequence = entry_id.partition("-")
    return int(millis) * 1_000_000 + int(sequence or 0)


def records_from_events(events: list[tuple[str, dict]]) -> tuple[list[TaskRecord], list[InstanceRecord]]:
    """Build the newest task and instance rows from a batch of (entry id, fields) events."""
    tasks: dict[str, TaskRecord] = {}
    instances: dict[tuple[str, str], InstanceRecord] = {}
    for entry_id, raw in events:
        fields = {_text(name): _text(value) for name, value in raw.items()}
        version = int(fields.get("version", "0"))
        task_id = fields.get("id", "")
        if not task_id:
            continue
        known = tasks.get(task_id)
        if known is None or version > known.version:
            tasks[task_id] = TaskRecord(
                id=task_id,
                provider_id=fields.get("provider", ""),
                instance_id=fields.get("instance") or None,
                user_id=fields.get("user", ""),
                task_type=fields.get("type", ""),
                status=fields.get("status", ""),
                progress=float(fields.get("progress") or 0),
                status_message=fields.get("message", ""),
                error_message=fields.get("error", ""),
                task_data=fields.get("data") or "{}",
                result=fields.get("result") or None,
                timeout_seconds=float(fields.get("timeout") or 0),
                attempts=int(fields.get("attempts") or 0),
                version=version,
                created_at=float(fields.get("created_at") or 0),
                started_at=_float_or_none(fields.get("started_at", "")),
                completed_at=_float_or_none(fields.get("completed_at", "")),
                updated_at=float(fields.get("updated_at") or 0),
            )
        instance = fields.get("instance", "")
        if fields.get("instance_changed") == "1" and instance:
            key = (fields.get("provider", ""), instance)
            instances[key] = InstanceRecord(
                id=instance,
                provider_id=key[0],
                status=fields.get("instance_status") or "unknown",
                last_task_id=task_id,
                version=event_position(entry_id),
                updated_at=float(fields.get("updated_at") or 0),
            )
    return list(tasks.values()), list(instances.values())


class Mirror:
    def __init__(self, config: Config, consumer: str) -> None:
        self.config = config
        self.consumer = consumer
        keys = Keys(config.redis.prefix)
        self.keys = keys
        self.streams = [keys.events(provider) for provider in config.providers]
        self.stopping = False
        self.written = 0

    def run(self) -> int:
        stop_on_sigterm(self)
        self.client = connect(self.config.redis.url)
        self.store = open_store(self.config.database.url, self.config.base_dir)
        log.info("mirror started streams=%d pid=%d", len(self.streams), os.getpid())
        backoff = 0.5
        own_pending = True
        next_refresh = 0.0
        while True:
            heartbeat.beat(tasks_done=self.written)
            try:
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + STREAM_REFRESH_SECONDS
                    if self.refresh_streams():
                        own_pending = True
                if not self.streams:
                    if self.stopping:
                        break
                    time.sleep(IDLE_SLEEP_SECONDS)
                    continue
                count = self.pass_once(own_pending)
                backoff = 0.5
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable in mirror retry_in=%.1fs error=%s", backoff, exc)
                heartbeat.beat(pause=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                own_pending = True
                continue
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("mirror consumer group missing; creating it error=%s", exc)
                next_refresh = 0.0
                continue
            except StoreError as exc:
                log.warning("database write failed; events kept in redis retry_in=%.1fs error=%s", backoff, exc)
                heartbeat.beat(pause=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                own_pending = True
                continue
            if own_pending and count == 0:
                own_pending = False
            elif count == 0 and self.stopping:
                break
        self.store.close()
        log.info("mirror stopped rows_written=%d pid=%d", self.written, os.getpid())
        return 0

    def refresh_streams(self) -> bool:
        """Add event streams that exist in Redis but not in the list; True when any was added.

        A provider removed at run time, or one whose settings are invalid, still has tasks
        that end after the change, and their final states must reach SQL too.
        """
        found = {
            _text(name) for name in self.client.scan_iter(match=f"{self.keys.prefix}:{{*}}:events", count=1000)
        }
        added = sorted(found - set(self.streams))
        self.streams += added
        # A stream can exist before its group: the state scripts create it with their first event.
        for stream in self.streams:
            ensure_group(self.client, stream, MIRROR_GROUP)
        return bool(added)

    def pass_once(self, own_pending: bool) -> int:
        """Mirror one batch; returns the number of events handled."""
        start = "0" if own_pending else ">"
        block = None if own_pending or self.stopping else READ_BLOCK_MS
        reply = self.client.xreadgroup(
            MIRROR_GROUP, self.consumer, {stream: start for stream in self.streams}, count=READ_COUNT, block=block
        )
        events: list[tuple[str, dict]] = []
        acks: dict[str, list[str]] = {}
        for stream_name, items in reply or []:
            stream = _text(stream_name)
            for entry_bytes, fields in items:
                entry_id = _text(entry_bytes)
                acks.setdefault(stream, []).append(entry_id)
                if fields:
                    events.append((entry_id, fields))
        if not acks:
            return 0

        tasks, instances = records_from_events(events)
        self.store.write_batch(tasks, instances)
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in acks.items():
            pipe.xack(stream, MIRROR_GROUP, *ids)
        pipe.execute()
        self.written += len(tasks)
        return sum(len(ids) for ids in acks.values())


def mirror_main(config: Config) -> int:
    return Mirror(config, f"{config.supervisor.name}-mirror").run()
