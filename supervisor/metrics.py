"""The /metrics families about task flow, Redis streams and reconnects.

supervisor/monitor.py writes the basic families (task counts from SQL, queue lengths,
workers, process memory and CPU) and calls `FlowMetrics.write` for these:

- Counters and histograms of finished tasks, which the SQL mirror process counts
  (see `TaskCounts`): once a batch of events is written to SQL, an event with a final
  status counts its task as ended and adds its run time (completed_at - started_at)
  and queue wait (started_at - created_at) to the histograms, and a `pending` event
  with `retry_at` set counts an automatic retry. The mirror reads every event anyway,
  so counting there costs no Redis read of its own. It puts a snapshot on the heartbeat
  table's board at most every PUBLISH_SECONDS and whenever it has caught up, and the
  monitor reads the board on each request. A restarted mirror goes on from the board,
  so the counts start at 0 only when the supervisor starts.
- Gauges read from Redis on each request: waiting automatic retries, dead-letter
  stream length, and the `lag` and `pending` of each consumer group (XINFO GROUPS) on
  the task and event streams. The SQL mirror's backlog is lag + pending of its group.
- Reconnects per role and target, from the counters that shared/logs.py keeps in the
  heartbeat table for every "redis unavailable" and "database write failed" line.
"""

import bisect
import logging
import threading
from collections import Counter

import orjson
import redis

from shared.heartbeat import RECONNECT_TARGETS, HeartbeatTable
from shared.keys import MIRROR_GROUP, Keys
from shared.redis_client import text as _text
from shared.settings import Config
from shared.states import TERMINAL_STATUSES, TaskStatus
from supervisor.prometheus import MetricsWriter

log = logging.getLogger(__name__)

# Upper bounds in seconds of the run time and queue wait histograms' buckets.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Seconds between two snapshots that the mirror puts on the board while events keep coming.
PUBLISH_SECONDS = 0.25
# Tasks whose retry count is remembered, so that a repeated event does not count twice.
MAX_REMEMBERED_RETRIES = 100_000
# The event fields that `observe` reads, with their names as Redis returns them.
OBSERVED_FIELDS = tuple(
    (name, name.encode())
    for name in ("status", "provider", "type", "id", "created_at", "started_at", "completed_at", "retry_at", "retries")
)
FINAL_STATUSES = frozenset(str(status) for status in TERMINAL_STATUSES)
# The statuses of the events that `observe` may count, as Redis returns them. A pending
# event counts only with `retry_at`.
COUNTED_STATUSES = frozenset(status.encode() for status in FINAL_STATUSES)


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


class TaskCounts:
    """Counts of ended tasks and retries and their histograms, from the events that the SQL mirror wrote.

    The mirror process keeps one, counts each event once its batch is in SQL, and
    puts a snapshot on the heartbeat table's board (see `snapshot`). The monitor turns
    the snapshot back into a TaskCounts for each /metrics request.
    """

    def __init__(self) -> None:
        self.ended: Counter[tuple[str, str, str]] = Counter()
        self.retries: Counter[tuple[str, str]] = Counter()
        self.run_time: dict[tuple[str, str], Histogram] = {}
        self.queue_wait: dict[tuple[str, str], Histogram] = {}
        # Task id -> its `retries` field when its last automatic retry was counted.
        self.retry_counts: dict[str, str] = {}

    def observe_fields(self, fields: dict[bytes, bytes]) -> bool:
        """Count one event with its fields as Redis returns them. Returns True when it counted."""
        # Most events (registered, started, progress) count for nothing: skip them
        # before decoding any field.
        if fields.get(b"status") not in COUNTED_STATUSES and not fields.get(b"retry_at"):
            return False
        return self.observe({name: _text(fields.get(raw_name, b"")) for name, raw_name in OBSERVED_FIELDS})

    def observe(self, event: dict[str, str]) -> bool:
        """Count one event: a task that ended, or an automatic retry that was scheduled. Returns True when it counted."""
        status = event.get("status", "")
        key = (event.get("provider", ""), event.get("type", ""))
        task_id = event.get("id", "")
        if status in FINAL_STATUSES:
            self.ended[(*key, status)] += 1
            self.retry_counts.pop(task_id, None)
            created, started, completed = (_seconds(event.get(name)) for name in ("created_at", "started_at", "completed_at"))
            # A task cancelled before it started has no started_at, so no run time.
            if started is not None and completed is not None:
                self.run_time.setdefault(key, Histogram()).observe(completed - started)
            if started is not None and created is not None:
                self.queue_wait.setdefault(key, Histogram()).observe(started - created)
            return True
        if status != TaskStatus.PENDING or not event.get("retry_at"):
            return False
        retries = event.get("retries", "")
        if self.retry_counts.get(task_id) == retries:
            return False
        if len(self.retry_counts) >= MAX_REMEMBERED_RETRIES:
            self.retry_counts.clear()
        self.retry_counts[task_id] = retries
        self.retries[key] += 1
        return True

    def snapshot(self) -> bytes:
        """Return the counts and histograms as JSON for the board, without the remembered retries."""
        return orjson.dumps({
            "ended": [[*key, count] for key, count in self.ended.items()],
            "retries": [[*key, count] for key, count in self.retries.items()],
            "run_time": [[*key, item.counts, item.total] for key, item in self.run_time.items()],
            "queue_wait": [[*key, item.counts, item.total] for key, item in self.queue_wait.items()],
        })  # fmt: skip

    @classmethod
    def from_snapshot(cls, contents: bytes) -> "TaskCounts":
        """Rebuild the counts from the JSON that `snapshot` made. Returns empty counts for b"" or invalid contents."""
        counts = cls()
        if not contents:
            return counts
        try:
            document = orjson.loads(contents)
            for provider, task_type, status, count in document["ended"]:
                counts.ended[(provider, task_type, status)] = count
            for provider, task_type, count in document["retries"]:
                counts.retries[(provider, task_type)] = count
            for name, target in (("run_time", counts.run_time), ("queue_wait", counts.queue_wait)):
                for provider, task_type, buckets, total in document[name]:
                    histogram = target[(provider, task_type)] = Histogram()
                    if len(buckets) != len(histogram.counts):
                        raise ValueError(f"{len(buckets)} buckets instead of {len(histogram.counts)}")
                    histogram.counts, histogram.total = list(buckets), float(total)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("task counts on the heartbeat board are invalid, so counting starts at 0 error=%s", exc)
            return cls()
        return counts

    def write(self, out: MetricsWriter) -> None:
        ended = sorted(self.ended.items())
        retries = sorted(self.retries.items())
        histograms = {
            name: sorted((key, list(item.counts), item.total) for key, item in source.items())
            for name, source in (("run", self.run_time), ("wait", self.queue_wait))
        }
        out.family(
            "taskvisor_tasks_ended_total", "counter",
            "Tasks that reached a final status (completed, failed, timeout, cancelled), counted by the SQL "
            "mirror since the supervisor started.",
        )  # fmt: skip
        for (provider, task_type, status), count in ended:
            out.sample("taskvisor_tasks_ended_total", {"provider": provider, "type": task_type, "status": status}, count)
        out.family(
            "taskvisor_task_retries_total", "counter",
            "Automatic retries scheduled after a failed or timed-out run, counted by the SQL mirror since the supervisor "
            "started.",
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
        self.table = table
        self.reconnects = ReconnectTotals(table)

    def write(self, out: MetricsWriter, client: redis.Redis | None) -> bool:
        """Write every family; returns False when the Redis gauges could not be read.

        Without a client, the Redis gauges have no samples.
        """
        TaskCounts.from_snapshot(self.table.read_board()).write(out)
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
