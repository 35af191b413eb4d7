"""The /metrics families about task flow, Redis streams and reconnects.

supervisor/monitor.py writes the basic families (task counts from SQL, queue lengths,
workers, process memory and CPU) and calls `FlowMetrics.write` for these:

- Counters and histograms of finished tasks. A thread of the monitor process follows
  every provider's event stream with plain XREAD, from the newest event at its start,
  and looks at each event once. An event with a final status counts the task as ended
  and adds its run time (completed_at - started_at) and queue wait (started_at -
  created_at) to the histograms. A `pending` event with `retry_at` set counts an
  automatic retry. The reader makes at most a few reads per second and no SQL query. The
  counts start at 0 when the monitor process starts, as Prometheus expects of counters.
- Gauges read from Redis on each request: waiting automatic retries, dead-letter
  stream length, and the `lag` and `pending` of each consumer group (XINFO GROUPS) on
  the task and event streams. The SQL mirror's backlog is lag + pending of its group.
- Reconnects per role and target, from the counters that shared/logs.py keeps in the
  heartbeat table for every "redis unavailable" and "database write failed" line.
"""

import bisect
import logging
import threading
import time
from collections import Counter

import redis

from shared.heartbeat import RECONNECT_TARGETS, HeartbeatTable
from shared.keys import MIRROR_GROUP, Keys
from shared.redis_client import connect, is_cluster, text as _text
from shared.settings import Config
from shared.states import TERMINAL_STATUSES, TaskStatus
from supervisor.prometheus import MetricsWriter

log = logging.getLogger(__name__)

# Upper bounds in seconds of the run time and queue wait histograms' buckets.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
READ_BLOCK_MS = 1000
READ_COUNT = 1000
# After a read that returned fewer than READ_COUNT events, seconds to wait before the
# next one. Events then arrive in large batches, so the reader makes a few reads per
# second instead of one per event. The counters lag by at most this much.
BATCH_PAUSE_SECONDS = 0.25
# On a Redis Cluster the streams lie in different slots and are read without blocking;
# seconds to wait after a read that found nothing.
CLUSTER_IDLE_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 5.0
# Tasks whose retry count is remembered, so that a repeated event does not count twice.
MAX_REMEMBERED_RETRIES = 100_000
# The event fields that `observe` reads, with their names as Redis returns them.
OBSERVED_FIELDS = tuple(
    (name, name.encode())
    for name in ("status", "provider", "type", "id", "created_at", "started_at", "completed_at", "retry_at", "retries")
)
FINAL_STATUSES = frozenset(str(status) for status in TERMINAL_STATUSES)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds


def _seconds(text: str | None) -> float | None:
    """Return a time field of an event as a number, or None when it is empty or invalid."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


class TaskEventReader:
    """Counts of ended tasks and retries and their histograms, read from the event streams by a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.url = config.redis.url
        self.streams = [Keys(config.redis.prefix).events(provider) for provider in sorted(config.providers)]
        self.lock = threading.Lock()
        self.ended: Counter[tuple[str, str, str]] = Counter()
        self.retries: Counter[tuple[str, str]] = Counter()
        self.run_time: dict[tuple[str, str], Histogram] = {}
        self.queue_wait: dict[tuple[str, str], Histogram] = {}
        # Task id -> its `retries` field when its last automatic retry was counted.
        self.retry_counts: dict[str, str] = {}
        # Stream -> id of the last event read; filled at the first connection.
        self.positions: dict[str, str] = {}

    def start(self) -> None:
        if self.streams:
            threading.Thread(target=self.run, name="event-reader", daemon=True).start()

    def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                client = connect(self.url, socket_timeout=READ_BLOCK_MS / 1000 + 5)
                if not self.positions:
                    self.positions = newest_ids(client, self.streams)
                cluster = is_cluster(client)
                while True:
                    self.read_once(client, cluster)
                    backoff = 0.5
            except redis.RedisError as exc:
                log.warning("redis unavailable in the event reader of /metrics retry_in=%.1fs error=%s", backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def read_once(self, client: redis.Redis, cluster: bool) -> None:
        if cluster:
            pipe = client.pipeline(transaction=False)
            for stream, position in self.positions.items():
                pipe.xread({stream: position}, count=READ_COUNT)
            reply = [item for result in pipe.execute() for item in result or []]
            if not reply:
                time.sleep(CLUSTER_IDLE_SECONDS)
        else:
            reply = client.xread(self.positions, count=READ_COUNT, block=READ_BLOCK_MS) or []
        read = 0
        for stream_name, items in reply:
            stream = _text(stream_name)
            read = max(read, len(items))
            for entry_id, fields in items:
                self.positions[stream] = _text(entry_id)
                if fields:
                    self.observe({name: _text(fields.get(raw_name, b"")) for name, raw_name in OBSERVED_FIELDS})
        if 0 < read < READ_COUNT:
            time.sleep(BATCH_PAUSE_SECONDS)

    def observe(self, event: dict[str, str]) -> None:
        """Count one event: a task that ended, or an automatic retry that was scheduled."""
        status = event.get("status", "")
        key = (event.get("provider", ""), event.get("type", ""))
        task_id = event.get("id", "")
        with self.lock:
            if status in FINAL_STATUSES:
                self.ended[(*key, status)] += 1
                self.retry_counts.pop(task_id, None)
                created, started, completed = (_seconds(event.get(name)) for name in ("created_at", "started_at", "completed_at"))
                # A task cancelled before it started has no started_at, so no run time.
                if started is not None and completed is not None:
                    self.run_time.setdefault(key, Histogram()).observe(completed - started)
                if started is not None and created is not None:
                    self.queue_wait.setdefault(key, Histogram()).observe(started - created)
            elif status == TaskStatus.PENDING and event.get("retry_at"):
                retries = event.get("retries", "")
                if self.retry_counts.get(task_id) != retries:
                    if len(self.retry_counts) >= MAX_REMEMBERED_RETRIES:
                        self.retry_counts.clear()
                    self.retry_counts[task_id] = retries
                    self.retries[key] += 1

    def write(self, out: MetricsWriter) -> None:
        with self.lock:
            ended = sorted(self.ended.items())
            retries = sorted(self.retries.items())
            histograms = {
                name: sorted((key, list(item.counts), item.total) for key, item in source.items())
                for name, source in (("run", self.run_time), ("wait", self.queue_wait))
            }
        out.family(
            "taskvisor_tasks_ended_total", "counter",
            "Tasks that reached a final status (completed, failed, timeout, cancelled), seen on the event "
            "streams since the monitor process started.",
        )  # fmt: skip
        for (provider, task_type, status), count in ended:
            out.sample("taskvisor_tasks_ended_total", {"provider": provider, "type": task_type, "status": status}, count)
        out.family(
            "taskvisor_task_retries_total", "counter",
            "Automatic retries scheduled after a failed or timed-out run, seen since the monitor process started.",
        )  # fmt: skip
        for (provider, task_type), count in retries:
            out.sample("taskvisor_task_retries_total", {"provider": provider, "type": task_type}, count)
        for name, description, source in (
            ("taskvisor_task_run_seconds",
             "Run time of the last run of ended tasks (completed_at - started_at) in seconds.", "run"),
            ("taskvisor_task_queue_wait_seconds",
             "Time from registration to the start of the last run of ended tasks (started_at - created_at) in seconds.",
             "wait"),
        ):  # fmt: skip
            out.family(name, "histogram", description)
            for (provider, task_type), counts, total in histograms[source]:
                out.histogram(name, {"provider": provider, "type": task_type}, DURATION_BUCKETS, counts, total)


def newest_ids(client: redis.Redis, streams: list[str]) -> dict[str, str]:
    """Return the id of each stream's newest entry, or 0-0 for an empty or missing stream."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xrevrange(stream, count=1)
    positions = {}
    for stream, newest in zip(streams, pipe.execute(), strict=True):
        positions[stream] = _text(newest[0][0]) if newest else "0-0"
    return positions


class ReconnectTotals:
    """Totals of the heartbeat table's reconnect counters per role and target, kept across process exits.

    A slot's counters vanish when the slot is given to a new process, so `collect` runs
    twice a second in the monitor's loop and adds the last values of every process that
    left the table to `retired`.
    """

    def __init__(self, table: HeartbeatTable) -> None:
        self.table = table
        self.lock = threading.Lock()
        # (slot index, pid, fork time) -> (role, counts in RECONNECT_TARGETS order)
        self.last: dict[tuple[int, int, float], tuple[str, tuple[int, ...]]] = {}
        self.retired: Counter[tuple[str, str]] = Counter()

    def collect(self) -> None:
        current = {}
        for slot in self.table.read_all():
            if slot.pid:
                counts = (slot.redis_reconnects, slot.database_reconnects)
                current[(slot.index, slot.pid, slot.started)] = (slot.role, counts)
        with self.lock:
            for key, (role, counts) in self.last.items():
                if key not in current:
                    for target, count in zip(RECONNECT_TARGETS, counts, strict=True):
                        self.retired[(role, target)] += count
                else:
                    # A slot being handed to a new process reads as zero for a moment, so the
                    # larger reading is kept and a count never goes down.
                    role_now, counts_now = current[key]
                    current[key] = (role_now, tuple(map(max, counts, counts_now)))
            self.last = current

    def totals(self) -> dict[tuple[str, str], int]:
        self.collect()
        with self.lock:
            totals = Counter(self.retired)
            for role, counts in self.last.values():
                for target, count in zip(RECONNECT_TARGETS, counts, strict=True):
                    totals[(role, target)] += count
        return totals

    def write(self, out: MetricsWriter) -> None:
        out.family(
            "taskvisor_reconnects_total", "counter",
            "Times a process lost its connection to Redis or the SQL database and retried, by role and target.",
        )  # fmt: skip
        totals = self.totals()
        for role in sorted({role for role, _target in totals}):
            for target in RECONNECT_TARGETS:
                out.sample("taskvisor_reconnects_total", {"role": role, "target": target}, totals[(role, target)])


class FlowMetrics:
    """The families of this module for one monitor process."""

    def __init__(self, config: Config, table: HeartbeatTable) -> None:
        self.keys = Keys(config.redis.prefix)
        self.providers = sorted(config.providers)
        self.events = TaskEventReader(config)
        self.reconnects = ReconnectTotals(table)

    def start(self) -> None:
        self.events.start()

    def write(self, out: MetricsWriter, client: redis.Redis | None) -> bool:
        """Write every family; returns False when the Redis gauges could not be read.

        Without a client, the Redis gauges have no samples.
        """
        self.events.write(out)
        self.reconnects.write(out)
        return self.write_stream_gauges(out, client)

    def write_stream_gauges(self, out: MetricsWriter, client: redis.Redis | None) -> bool:
        replies = []
        if client is not None:
            pipe = client.pipeline(transaction=False)
            for provider in self.providers:
                pipe.zcard(self.keys.retries(provider))
                pipe.xlen(self.keys.dead(provider))
                pipe.xinfo_groups(self.keys.tasks(provider))
                pipe.xinfo_groups(self.keys.events(provider))
            try:
                # A stream that does not exist yet makes its XINFO GROUPS fail alone.
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                # taskvisor_source_up reports the failure, and the monitor's queue
                # length read logs it.
                log.debug("stream gauges not read for /metrics error=%s", exc)
        failed = len(replies) != 4 * len(self.providers) or any(
            isinstance(reply, redis.ConnectionError | redis.TimeoutError) for reply in replies
        )
        if failed:
            replies = []

        rows = [replies[index : index + 4] for index in range(0, len(replies), 4)]
        out.family("taskvisor_retries_waiting", "gauge", "Tasks waiting for an automatic retry (the provider's retries sorted set).")
        for provider, row in zip(self.providers, rows):
            if isinstance(row[0], int):
                out.sample("taskvisor_retries_waiting", {"provider": provider}, row[0])
        out.family(
            "taskvisor_dead_letters", "gauge",
            "Entries in the provider's dead-letter stream (XLEN; capped near redis.deadMaxLen).",
        )  # fmt: skip
        for provider, row in zip(self.providers, rows):
            if isinstance(row[1], int):
                out.sample("taskvisor_dead_letters", {"provider": provider}, row[1])

        groups = []
        for provider, row in zip(self.providers, rows):
            for stream, reply in (("tasks", row[2]), ("events", row[3])):
                if isinstance(reply, list):
                    groups += [(provider, stream, group) for group in reply]
        write_group_gauges(out, groups)
        return not failed


def write_group_gauges(out: MetricsWriter, groups: list[tuple[str, str, dict]]) -> None:
    """Write lag and pending of each consumer group, and the SQL mirror's backlog."""
    out.family(
        "taskvisor_consumer_group_lag", "gauge",
        "Entries of the stream not yet delivered to the consumer group (XINFO GROUPS lag); absent when Redis cannot tell.",
    )  # fmt: skip
    for provider, stream, group in groups:
        if group.get("lag") is not None:
            labels = {"provider": provider, "stream": stream, "group": _text(group.get("name"))}
            out.sample("taskvisor_consumer_group_lag", labels, int(group["lag"]))
    out.family(
        "taskvisor_consumer_group_pending", "gauge",
        "Entries delivered to the consumer group but not acknowledged yet (XINFO GROUPS pending).",
    )  # fmt: skip
    for provider, stream, group in groups:
        labels = {"provider": provider, "stream": stream, "group": _text(group.get("name"))}
        out.sample("taskvisor_consumer_group_pending", labels, int(group.get("pending") or 0))
    out.family(
        "taskvisor_mirror_backlog", "gauge",
        "Events of the provider not yet written to SQL: lag + pending of the mirror group on its event stream.",
    )  # fmt: skip
    for provider, stream, group in groups:
        if stream == "events" and _text(group.get("name")) == MIRROR_GROUP and group.get("lag") is not None:
            out.sample("taskvisor_mirror_backlog", {"provider": provider}, int(group["lag"]) + int(group.get("pending") or 0))
