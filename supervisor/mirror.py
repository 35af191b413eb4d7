"""The mirror process: copies every task state change from Redis into the SQL store.

It reads all providers' event streams through the `mirror` consumer group, in
batches: with one XREADGROUP on one Redis server, and with one per stream on a Redis
Cluster, which rejects a command over keys of several slots. Within a batch only the
newest state of each task and of each instance is written, in one transaction, and
the events are acknowledged only after the commit.
Writes are versioned, so an event replayed after a crash never moves a row back.
While the database is unreachable the events wait in Redis and the mirror retries.

The mirror also counts ended tasks and retries for /metrics (`TaskCounts` in
supervisor/metrics.py), after each batch is written, and puts the counts on the
heartbeat table's board for the monitor.
"""

import logging
import os
import time

import redis

from shared import heartbeat
from shared.errors import StoreError
from shared.keys import MIRROR_GROUP, Keys
from shared.process import stop_on_sigterm
from shared.redis_client import connect, ensure_group, is_cluster, text as _text
from shared.settings import Config
from shared.store import Store, open_store
from shared.store.records import InstanceRecord, TaskRecord
from supervisor.metrics import PUBLISH_SECONDS, TaskCounts

log = logging.getLogger(__name__)

READ_COUNT = 2000
READ_BLOCK_MS = 200
# Seconds between two looks for event streams of providers the config does not list.
STREAM_REFRESH_SECONDS = 5.0
IDLE_SLEEP_SECONDS = 0.2
# After a batch smaller than READ_COUNT, seconds to wait before the next read, so that
# events gather into larger batches: one read, one transaction and one XACK then cover
# many events. It adds at most this much to the time an event takes to reach SQL.
BATCH_PAUSE_SECONDS = 0.05
# Seconds a mirror on a Redis Cluster waits after a pass that found no new event.
CLUSTER_IDLE_SECONDS = 0.1
# Seconds between two trims of the event streams.
TRIM_INTERVAL_SECONDS = 10.0


def _float_or_none(value: bytes | None) -> float | None:
    return float(value) if value else None


def event_position(entry_id: str) -> int:
    """Turn a stream entry id into one integer that keeps the stream's order."""
    millis, _, sequence = entry_id.partition("-")
    return int(millis) * 1_000_000 + int(sequence or 0)


def _field(raw: dict, name: bytes) -> str:
    """Return one field of an event as text ('' when absent); fields are bytes, as Redis returns them."""
    value = raw.get(name)
    return value.decode("utf-8", "replace") if value else ""


def records_from_events(events: list[tuple[str, dict]]) -> tuple[list[TaskRecord], list[InstanceRecord]]:
    """Build the newest task and instance rows from a batch of (entry id, fields) events.

    The events are in stream order and their fields are bytes, as Redis returns them. Only
    the newest event of each task is made into a task row, and only the fields of that row
    are decoded. An instance change decodes the four fields of its instance row.
    """
    tasks: dict[str, TaskRecord] = {}
    instances: dict[tuple[str, str], InstanceRecord] = {}
    for entry_id, raw in reversed(events):
        task_id = _field(raw, b"id")
        if task_id and task_id not in tasks:
            tasks[task_id] = task_record(task_id, raw)
        if raw.get(b"instance_changed") != b"1" or not raw.get(b"instance"):
            continue
        key = (_field(raw, b"provider"), _field(raw, b"instance"))
        if key not in instances:
            instances[key] = InstanceRecord(
                id=key[1],
                provider_id=key[0],
                status=_field(raw, b"instance_status") or "unknown",
                last_task_id=task_id,
                version=event_position(entry_id),
                updated_at=float(raw.get(b"updated_at") or 0),
            )
    return list(tasks.values()), list(instances.values())


def task_record(task_id: str, raw: dict) -> TaskRecord:
    """Build a task row from the fields of one event, as bytes."""
    return TaskRecord(
        id=task_id,
        provider_id=_field(raw, b"provider"),
        instance_id=_field(raw, b"instance") or None,
        user_id=_field(raw, b"user"),
        task_type=_field(raw, b"type"),
        status=_field(raw, b"status"),
        progress=float(raw.get(b"progress") or 0),
        status_message=_field(raw, b"message"),
        error_message=_field(raw, b"error"),
        task_data=_field(raw, b"data") or "{}",
        result=_field(raw, b"result") or None,
        timeout_seconds=float(raw.get(b"timeout") or 0),
        attempts=int(raw.get(b"attempts") or 0),
        version=int(raw.get(b"version") or 0),
        created_at=float(raw.get(b"created_at") or 0),
        started_at=_float_or_none(raw.get(b"started_at")),
        completed_at=_float_or_none(raw.get(b"completed_at")),
        updated_at=float(raw.get(b"updated_at") or 0),
    )


class Mirror:
    def __init__(self, config: Config, consumer: str) -> None:
        self.config = config
        self.consumer = consumer
        keys = Keys(config.redis.prefix)
        self.keys = keys
        self.streams = [keys.events(provider) for provider in config.providers]
        self.stopping = False
        self.written = 0
        self.counts = TaskCounts()
        # Whether the counts changed since they were last put on the board, and when that was.
        self.counts_changed = False
        self.published_at = 0.0
        self.board_full_logged = False

    def run(self) -> int:
        stop_on_sigterm(self)
        # A mirror that replaces one that exited goes on from the counts it published.
        self.counts = TaskCounts.from_snapshot(heartbeat.read_board())
        self.client = connect(self.config.redis.url)
        self.cluster = is_cluster(self.client)
        # Opened in the loop, so that a database that is down at start is retried like a failed write.
        self.store: Store | None = None
        log.info("mirror started streams=%d pid=%d", len(self.streams), os.getpid())
        backoff = 0.5
        store_failures = 0
        own_pending = True
        next_refresh = 0.0
        # Short retentions are kept to within about half their length.
        trim_interval = min(TRIM_INTERVAL_SECONDS, max(1.0, self.config.redis.events_retention / 2))
        next_trim = time.monotonic() + trim_interval
        while True:
            heartbeat.beat(tasks_done=self.written)
            try:
                if self.store is None:
                    self.store = open_and_init_store(self.config)
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
                if store_failures:
                    log.info("database writes resumed after %d failed attempts", store_failures)
                    store_failures = 0
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + trim_interval
                    self.trim_streams()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self.stopping:
                    log.warning("mirror stopping while redis is unavailable error=%s", exc)
                    break
                log.warning("redis unavailable in mirror retry_in=%.1fs error=%s", backoff, exc)
                heartbeat.beat(pause=backoff)
                self.sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 5.0)
                own_pending = True
                continue
            except redis.ResponseError as exc:
                # NOGROUP: the group is gone; UNBLOCKED: the stream was deleted during a blocking
                # read. Both happen when Redis is emptied, and both mean: create them again.
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                log.warning("mirror consumer group missing; creating it error=%s", exc)
                next_refresh = 0.0
                continue
            except StoreError as exc:
                store_failures += 1
                if self.stopping:
                    # The events stay pending in Redis, and the next mirror reads them first.
                    log.warning("mirror stopping with events not written; they wait in redis error=%s", exc)
                    break
                log.warning("database write failed; events kept in redis retry_in=%.1fs error=%s", backoff, exc)
                heartbeat.beat(pause=backoff)
                self.sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 10.0)
                own_pending = True
                continue
            self.publish_counts(caught_up=count < READ_COUNT)
            if own_pending and count == 0:
                own_pending = False
            elif count == 0 and self.stopping:
                break
            elif 0 < count < READ_COUNT and not own_pending and not self.stopping:
                time.sleep(BATCH_PAUSE_SECONDS)
        self.publish_counts(caught_up=True)
        if self.store is not None:
            self.store.close()
        log.info("mirror stopped rows_written=%d pid=%d", self.written, os.getpid())
        return 0

    def sleep_unless_stopping(self, seconds: float) -> None:
        """Sleep for `seconds`, or less when SIGTERM arrives meanwhile."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(IDLE_SLEEP_SECONDS, deadline - time.monotonic()))

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
        reply = self.read_streams(start, block)
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
        # Counted only after the acknowledgement, so events read again after a failed write are not counted twice.
        for _entry_id, fields in events:
            if self.counts.observe_fields(fields):
                self.counts_changed = True
        return sum(len(ids) for ids in acks.values())

    def publish_counts(self, caught_up: bool) -> None:
        """Put the task counts on the board when they changed: at once when the mirror has caught up, else every PUBLISH_SECONDS."""
        now = time.monotonic()
        if not self.counts_changed or (not caught_up and now - self.published_at < PUBLISH_SECONDS):
            return
        self.counts_changed = False
        self.published_at = now
        snapshot = self.counts.snapshot()
        if not heartbeat.publish_board(snapshot) and not self.board_full_logged:
            self.board_full_logged = True
            log.error(
                "task counts for /metrics do not fit on the heartbeat board, so /metrics keeps older counts"
                " bytes=%d limit=%d", len(snapshot), heartbeat.BOARD_BYTES,
            )  # fmt: skip

    def read_streams(self, start: str, block: int | None) -> list:
        """Read from every event stream from `start` ("0": own pending, ">": new) as XREADGROUP replies."""
        if not self.cluster:
            return self.client.xreadgroup(
                MIRROR_GROUP, self.consumer, {stream: start for stream in self.streams}, count=READ_COUNT, block=block
            ) or []
        # One blocking read per stream would wait for each stream in turn, so these reads
        # do not block. The pipeline sends them in one round trip per cluster node.
        pipe = self.client.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xreadgroup(MIRROR_GROUP, self.consumer, {stream: start}, count=READ_COUNT)
        reply = [item for result in pipe.execute() for item in result or []]
        if not reply and block:
            time.sleep(CLUSTER_IDLE_SECONDS)
        return reply

    def trim_streams(self) -> int:
        """Trim events that every consumer group has handled and that are older than the retention.

        An event that a group has not read or not acknowledged yet is never trimmed, so
        SQL misses no state change however long the database was away. Returns how many
        entries were removed.
        """
        retention_ms = int(self.config.redis.events_retention * 1000)
        cutoff = int(time.time() * 1000) - retention_ms
        removed = 0
        for stream in self.streams:
            try:
                groups = self.client.xinfo_groups(stream)
            except redis.ResponseError:
                continue
            limit = cutoff
            for group in groups:
                limit = min(limit, _handled_below(self.client, stream, group))
            if limit > 0:
                removed += self.client.xtrim(stream, minid=f"{limit}-0", approximate=False)
        log.debug("event streams trimmed streams=%d removed=%d", len(self.streams), removed)
        return removed


def _handled_below(client: redis.Redis, stream: str, group: dict) -> int:
    """Return a millisecond time below which `group` has read and acknowledged every entry."""
    name = _text(group["name"])
    if group.get("pending"):
        summary = client.xpending(stream, name)
        oldest = _text(summary.get("min") or "0-0")
        return int(oldest.partition("-")[0])
    last = _text(group.get("last-delivered-id") or "0-0")
    # Entries of the same millisecond as the last one read may still be unread.
    return int(last.partition("-")[0])


def open_and_init_store(config: Config) -> Store:
    """Open the SQL store and create its tables if they are missing, raising StoreError."""
    store = open_store(config.database.url, config.base_dir)
    try:
        store.init_schema()
    except StoreError:
        store.close()
        raise
    return store


def mirror_main(config: Config) -> int:
    return Mirror(config, f"{config.supervisor.name}-mirror").run()
