"""The checks behind the health endpoint of one supervisor.

supervisor/health_server.py serves them over HTTP from the monitor process:

- `/healthz`: 200 while the supervisor's main loop has run within
  `health.heartbeatTimeout` seconds, else 503. It shows only that the supervisor lives.
- `/readyz`: 200 only when taskvisor can do its work: Redis replies to PING, the SQL
  store runs a trivial query, each provider has as many working workers as its target,
  and no child process is stopped, a zombie, silent or recently crashed. Otherwise
  503 with every reason.
- `/status`: JSON with each process: role, provider, slot, current task, memory,
  CPU and heartbeat age.
- `/metrics`: the Prometheus text format, version 0.0.4.

Process state comes from the shared heartbeat table (shared/heartbeat.py), not from
Redis, so a dead, stopped or silent process shows even while Redis is down.
"""

import logging
import math
import os
import threading
import time

import orjson
import psutil
import redis

from shared import heartbeat
from shared.errors import StoreError
from shared.heartbeat import (
    EXITED,
    FLAG_EXIT_REQUESTED,
    FLAG_STOPPING,
    LIVE,
    SUPERVISOR_SLOT,
    HeartbeatTable,
    Slot,
)
from shared.keys import MIRROR_GROUP, Keys
from shared.redaction import redact_url
from shared.redis_client import connect, text as _text
from shared.settings import Config
from shared.store import Store, open_store
from supervisor.children import RECYCLE_REASONS
from supervisor.metrics import FlowMetrics
from supervisor.prometheus import MetricsWriter
from supervisor.status import STATUS_TTL_MS, status_key
from worker.main import consumer_name

log = logging.getLogger(__name__)

# Seconds that one Redis command of a check may take before the check fails.
REDIS_CHECK_TIMEOUT_SECONDS = 2.0
# psutil process states in which a process does not run.
HALTED_STATES = {
    psutil.STATUS_ZOMBIE: "has exited and waits to be reaped (zombie)",
    psutil.STATUS_STOPPED: "is stopped (SIGSTOP or job control); send SIGCONT to let it run",
    psutil.STATUS_TRACING_STOP: "is stopped by a debugger or tracer",
    psutil.STATUS_DEAD: "is dead",
}
# Processes whose heartbeat /readyz checks. The monitor serves the request, so it is not checked.
CHECKED_ROLES = ("intake", "mirror", "worker")
# Minimum seconds between two identical warnings, for failures that repeat on every scrape.
WARNING_INTERVAL_SECONDS = 60.0
# Internal use of the store: `Store._select` is the store's one query method, and
# shared/store has no public query for these counts.
# NOTE: no index covers (provider_id, task_type, status), so every scrape scans the whole table.
TASK_COUNT_QUERY = (
    "SELECT provider_id, task_type, status, COUNT(*) AS task_count FROM taskvisor_tasks"
    " GROUP BY provider_id, task_type, status"
)


class Monitor:
    """The checks behind the endpoints. Request threads share one instance."""

    def __init__(self, config: Config, table: HeartbeatTable) -> None:
        self.config = config
        self.table = table
        self.timeout = config.health.heartbeat_timeout
        self.keys = Keys(config.redis.prefix)
        self.redis = connect(
            config.redis.url, socket_timeout=REDIS_CHECK_TIMEOUT_SECONDS, connect_timeout=REDIS_CHECK_TIMEOUT_SECONDS
        )
        self.store: Store | None = None
        self.store_lock = threading.Lock()
        # pid -> (process, whether cpu_percent has been called on it before)
        self.processes: dict[int, tuple[psutil.Process, bool]] = {}
        self.processes_lock = threading.Lock()
        # The last /readyz verdict, so that only changes are logged.
        self.last_ready: bool | None = None
        # Warning text -> time.monotonic() when it was last logged.
        self.warned_at: dict[str, float] = {}
        self.flow = FlowMetrics(config, table)

    def warn_limited(self, what: str, error: Exception) -> None:
        """Log a warning about `what`, at most once per WARNING_INTERVAL_SECONDS."""
        now = time.monotonic()
        if now - self.warned_at.get(what, -math.inf) >= WARNING_INTERVAL_SECONDS:
            self.warned_at[what] = now
            log.warning("%s error=%s", what, error)

    # -- sources ----------------------------------------------------------------------

    def check_redis(self) -> str | None:
        """Return why Redis failed PING, or None when it replied."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return f"redis at {redact_url(self.config.redis.url)} did not answer PING: {exc}"
        return None

    def query_store(self, sql: str) -> list[dict]:
        """Run one read-only query, opening the store on first use and again after a failure.

        Raises StoreError.
        """
        with self.store_lock:
            try:
                if self.store is None:
                    self.store = open_store(self.config.database.url, self.config.base_dir)
                return self.store._select(sql, ())
            except StoreError:
                self._drop_store()
                raise

    def check_store(self) -> str | None:
        """Return why the SQL store failed a trivial query, or None when the query succeeded."""
        try:
            self.query_store("SELECT 1 AS one")
        except StoreError as exc:
            return f"database check failed: {exc}"
        return None

    def _drop_store(self) -> None:
        store, self.store = self.store, None
        if store is None:
            return
        try:
            store.close()
        except StoreError as exc:
            log.debug("closing the store after a failed query also failed: %s", exc)

    def close(self) -> None:
        with self.store_lock:
            self._drop_store()
        self.redis.close()

    def worker_targets(self) -> tuple[dict[str, int], str | None]:
        """Return the number of workers each provider should have, and a reason when it is unsure.

        The supervisor's status record in Redis has the live targets, which change with
        `taskvisor provider set` and pause. Without the record, the targets of the
        configuration this process was started with are used.
        """
        fallback = self.fallback_targets()
        key = status_key(self.keys, self.config.supervisor.name)
        try:
            raw = self.redis.get(key)
        except redis.RedisError:
            # check_redis reports the failure.
            return fallback, None
        if raw is None:
            return fallback, (
                f"the supervisor's status record {key} is missing in Redis (the supervisor writes it every "
                f"second, and it expires after {STATUS_TTL_MS / 1000:g} s)"
            )
        try:
            providers = orjson.loads(raw)["providers"]
            return {provider: int(entry["target"]) for provider, entry in providers.items()}, None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return fallback, f"the supervisor's status record {key} is invalid: {exc!r}"

    def busy_tasks(self, providers: list[str]) -> dict[str, tuple[str, float]]:
        """Return `<consumer>:<pid>` -> (task id, start time) from the busy hashes. Raises RedisError."""
        pipe = self.redis.pipeline(transaction=False)
        for provider in providers:
            pipe.hgetall(self.keys.busy(provider))
        busy: dict[str, tuple[str, float]] = {}
        for entries in pipe.execute():
            for owner, value in entries.items():
                task_id, _, started = value.decode("utf-8", "replace").rpartition(" ")
                try:
                    busy[owner.decode("utf-8", "replace")] = (task_id, float(started))
                except ValueError:
                    continue
        return busy

    # -- processes --------------------------------------------------------------------

    def process(self, pid: int) -> tuple[psutil.Process, bool]:
        """Return the cached psutil handle of `pid` and whether its CPU was sampled before.

        Raises psutil.NoSuchProcess when no such process exists.
        """
        with self.processes_lock:
            cached = self.processes.get(pid)
            if cached is not None and cached[0].is_running():
                return cached
            handle = psutil.Process(pid)
            self.processes[pid] = (handle, False)
            return handle, False

    def forget_processes(self, live_pids: set[int]) -> None:
        with self.processes_lock:
            for pid in set(self.processes) - live_pids:
                del self.processes[pid]

    def process_usage(self, pid: int) -> dict:
        """Return the RSS in bytes, CPU seconds and CPU percent of `pid`; None where unknown.

        The CPU percent covers the time since the previous request that sampled this
        process, so the first request gets None.
        """
        usage: dict = {"rss_bytes": None, "cpu_seconds": None, "cpu_percent": None, "state": "gone"}
        try:
            handle, sampled = self.process(pid)
            with handle.oneshot():
                usage["state"] = handle.status()
                usage["rss_bytes"] = handle.memory_info().rss
                times = handle.cpu_times()
                usage["cpu_seconds"] = times.user + times.system
                percent = handle.cpu_percent(interval=None)
            usage["cpu_percent"] = percent if sampled else None
            with self.processes_lock:
                self.processes[pid] = (handle, True)
        except psutil.Error:
            pass
        return usage

    def process_problem(self, slot: Slot, now: float) -> str | None:
        """Return why a live child is not working, or None when it runs and beats in time."""
        name = slot.describe()
        try:
            state = self.process(slot.pid)[0].status()
        except psutil.NoSuchProcess:
            return f"{name} has exited"
        except psutil.Error as exc:
            return f"{name} could not be inspected: {exc}"
        if state in HALTED_STATES:
            return f"{name} {HALTED_STATES[state]}"
        if not slot.has_beaten:
            since_start = now - slot.started
            if since_start > self.timeout:
                return f"{name} has sent no heartbeat in the {since_start:.1f} s since it started"
            return f"{name} is starting and has sent no heartbeat yet"
        allowed = self.timeout + slot.pause
        age = now - slot.heartbeat
        if age > allowed:
            return f"{name} has sent no heartbeat for {age:.1f} s (limit {allowed:g} s)"
        return None

    # -- endpoints ----------------------------------------------------------------------

    def liveness_reasons(self, supervisor: Slot, now: float) -> list[str]:
        try:
            state = self.process(supervisor.pid)[0].status()
        except psutil.Error:
            state = ""
        if state in HALTED_STATES:
            return [f"the supervisor pid {supervisor.pid} {HALTED_STATES[state]}"]
        if not supervisor.has_beaten:
            return ["the supervisor has sent no heartbeat yet"]
        age = now - supervisor.heartbeat
        if age > self.timeout:
            return [f"the supervisor's main loop has not run for {age:.1f} s (health.heartbeatTimeout is {self.timeout:g} s)"]
        return []

    def healthz(self) -> tuple[int, dict]:
        now = time.monotonic()
        supervisor = self.table.read_slot(SUPERVISOR_SLOT)
        reasons = self.liveness_reasons(supervisor, now)
        body = {
            "healthy": not reasons,
            "supervisor_pid": supervisor.pid,
            "heartbeat_age_seconds": round(now - supervisor.heartbeat, 3) if supervisor.has_beaten else None,
            "reasons": reasons,
        }
        return (503 if reasons else 200), body

    def readyz(self) -> tuple[int, dict]:
        now = time.monotonic()
        slots = self.table.read_all()
        supervisor = self.table.read_slot(SUPERVISOR_SLOT)
        reasons = self.liveness_reasons(supervisor, now)
        if supervisor.flags & FLAG_STOPPING:
            reasons.append("the supervisor is shutting down")

        redis_problem = self.check_redis()
        if redis_problem:
            reasons.append(redis_problem)
        store_problem = self.check_store()
        if store_problem:
            reasons.append(store_problem)
        if redis_problem:
            targets = self.fallback_targets()
        else:
            targets, target_problem = self.worker_targets()
            if target_problem:
                reasons.append(target_problem)

        if not redis_problem:
            reasons += self.mirror_lag_reasons(list(targets))
        reasons += self.child_reasons(slots, targets, now)
        ready = not reasons
        if ready != self.last_ready:
            # Not ready before the first ready verdict is the normal start-up.
            level = logging.INFO if self.last_ready is None else logging.WARNING
            self.last_ready = ready
            if ready:
                log.info("ready")
            else:
                log.log(level, "not ready: %s", "; ".join(reasons))
        return (503 if reasons else 200), {"ready": ready, "reasons": reasons}

    def mirror_lag_reasons(self, providers: list[str]) -> list[str]:
        """Return a reason for each provider whose oldest unwritten state change is older than the limit.

        The age is that of the oldest event the mirror group has not acknowledged: its
        oldest pending entry, or else the first entry it has not read.
        """
        limit = self.config.health.mirror_lag_limit
        reasons = []
        try:
            now_ms = int(self.redis.time()[0]) * 1000
            for provider in providers:
                stream = self.keys.events(provider)
                oldest = self._oldest_unwritten(stream)
                if oldest is None:
                    continue
                age = (now_ms - int(oldest.partition("-")[0])) / 1000
                if age > limit:
                    reasons.append(
                        f"the SQL mirror is {age:.0f} s behind on provider {provider} (limit {limit:g} s, "
                        f"health.mirrorLagLimit): check the database and the mirror's log"
                    )
        except redis.RedisError as exc:
            self.warn_limited("mirror lag not read", exc)
        return reasons

    def _oldest_unwritten(self, stream: str) -> str | None:
        """Return the id of the oldest event of `stream` that the mirror has not acknowledged."""
        try:
            groups = {_text(group["name"]): group for group in self.redis.xinfo_groups(stream)}
        except redis.ResponseError:
            return None
        group = groups.get(MIRROR_GROUP)
        if group is None:
            return None
        if group.get("pending"):
            return _text(self.redis.xpending(stream, MIRROR_GROUP).get("min") or "") or None
        last = _text(group.get("last-delivered-id") or "0-0")
        unread = self.redis.xrange(stream, min=f"({last}", count=1)
        return _text(unread[0][0]) if unread else None

    def fallback_targets(self) -> dict[str, int]:
        return {provider: settings.group_size for provider, settings in self.config.providers.items()}

    def child_reasons(self, slots: list[Slot], targets: dict[str, int], now: float) -> list[str]:
        """Return the problems of the children: halted, silent, missing or recently crashed ones."""
        reasons = []
        working = dict.fromkeys(targets, 0)
        present = set()
        for slot in slots:
            if slot.state != LIVE or slot.role not in CHECKED_ROLES:
                continue
            present.add(slot.role)
            problem = self.process_problem(slot, now)
            if problem:
                reasons.append(problem)
            elif slot.role == "worker" and slot.provider in working:
                working[slot.provider] += 1

        for provider, target in sorted(targets.items()):
            if working[provider] < target:
                reasons.append(f"provider {provider} has {working[provider]} of {target} workers working")
        if targets:
            for role in ("intake", "mirror"):
                if role not in present:
                    reasons.append(f"no {role} process is running")

        # A crash that the supervisor repaired at once still counts for one heartbeat
        # timeout, like a silent process, so that a checker polling at least that often notices it.
        for slot in slots:
            if slot.state != EXITED or slot.flags & FLAG_EXIT_REQUESTED or slot.role not in CHECKED_ROLES:
                continue
            ago = now - slot.ended
            code = os.WEXITSTATUS(slot.wait_status)
            # A worker that recycled itself after a task exits with one of RECYCLE_REASONS' codes.
            recycled = slot.role == "worker" and code in RECYCLE_REASONS
            abnormal = os.WIFSIGNALED(slot.wait_status) or (code != 0 and not recycled)
            if abnormal and ago <= self.timeout:
                reasons.append(f"{slot.describe()} {heartbeat.describe_exit(slot.wait_status)} {ago:.1f} s ago")
        return reasons

    def status(self) -> tuple[int, dict]:
        now = time.monotonic()
        slots = self.table.read_all()
        live = [slot for slot in slots if slot.state == LIVE]
        self.forget_processes({slot.pid for slot in live})

        redis_error = None
        busy: dict[str, tuple[str, float]] = {}
        try:
            busy = self.busy_tasks(sorted({slot.provider for slot in live if slot.role == "worker"}))
        except redis.RedisError as exc:
            redis_error = f"busy workers not read from redis: {exc}"
            self.warn_limited("busy workers not read for /status", exc)

        processes = []
        for slot in live:
            entry = {
                "pid": slot.pid,
                "role": slot.role,
                "provider": slot.provider or None,
                "slot": slot.worker_slot if slot.role == "worker" else None,
                "heartbeat_age_seconds": round(now - slot.heartbeat, 3) if slot.has_beaten else None,
                "uptime_seconds": round(now - slot.started, 3),
                "tasks_done": slot.tasks_done if slot.role in ("worker", "mirror") else None,
                "task_id": None,
                "task_started_at": None,
            }
            if slot.role == "worker":
                owner = f"{consumer_name(self.config.supervisor.name, slot.provider, slot.worker_slot)}:{slot.pid}"
                if owner in busy:
                    entry["task_id"], entry["task_started_at"] = busy[owner]
            usage = self.process_usage(slot.pid)
            del usage["cpu_seconds"]
            entry.update(usage)
            processes.append(entry)

        exits = [
            {
                "pid": slot.pid,
                "role": slot.role,
                "provider": slot.provider or None,
                "slot": slot.worker_slot if slot.role == "worker" else None,
                "exit": describe_exit(slot),
                "requested": bool(slot.flags & FLAG_EXIT_REQUESTED),
                "seconds_ago": round(now - slot.ended, 3),
            }
            for slot in sorted(slots, key=lambda slot: slot.ended, reverse=True)
            if slot.state == EXITED and now - slot.ended <= self.table.exit_record_seconds
        ]
        body = {
            "name": self.config.supervisor.name,
            "heartbeat_timeout_seconds": self.timeout,
            "processes": processes,
            "recent_exits": exits,
            "errors": [redis_error] if redis_error else [],
        }
        return 200, body

    def metrics(self) -> str:
        """Render the metrics in the Prometheus text format 0.0.4."""
        out = MetricsWriter()
        out.family("taskvisor_up", "gauge", "1 while the health endpoint of the supervisor responds.")
        out.sample("taskvisor_up", {}, 1)

        try:
            rows = self.query_store(TASK_COUNT_QUERY)
            store_up = 1
        except StoreError as exc:
            self.warn_limited("task counts not read for /metrics", exc)
            rows, store_up = [], 0
        out.family("taskvisor_tasks", "gauge", "Tasks in the SQL store by provider, task type and status.")
        for row in sorted(rows, key=lambda row: (row["provider_id"], row["task_type"], row["status"])):
            labels = {"provider": row["provider_id"], "type": row["task_type"], "status": row["status"]}
            out.sample("taskvisor_tasks", labels, int(row["task_count"]))

        providers = sorted(self.config.providers)
        queue_lengths, redis_up = self.queue_lengths(providers)
        out.family(
            "taskvisor_queue_length", "gauge",
            "Entries in the provider's task stream that no worker runs: XLEN of the stream minus the busy hash size.",
        )  # fmt: skip
        for provider, length in queue_lengths.items():
            out.sample("taskvisor_queue_length", {"provider": provider}, length)

        live = [slot for slot in self.table.read_all() if slot.state == LIVE]
        out.family("taskvisor_workers", "gauge", "Live worker processes by provider and state (busy runs a task).")
        for provider in providers:
            workers = [slot for slot in live if slot.role == "worker" and slot.provider == provider]
            busy = sum(1 for slot in workers if slot.task_started_at > 0)
            out.sample("taskvisor_workers", {"provider": provider, "state": "busy"}, busy)
            out.sample("taskvisor_workers", {"provider": provider, "state": "idle"}, len(workers) - busy)

        self.forget_processes({slot.pid for slot in live})
        usages = [(slot, self.process_usage(slot.pid)) for slot in live]
        out.family("taskvisor_process_resident_memory_bytes", "gauge", "Resident memory of each taskvisor process in bytes.")
        for slot, usage in usages:
            if usage["rss_bytes"] is not None:
                out.sample("taskvisor_process_resident_memory_bytes", _process_labels(slot), usage["rss_bytes"])
        out.family("taskvisor_process_cpu_seconds_total", "counter", "User and system CPU time of each taskvisor process in seconds.")
        for slot, usage in usages:
            if usage["cpu_seconds"] is not None:
                out.sample("taskvisor_process_cpu_seconds_total", _process_labels(slot), usage["cpu_seconds"])

        # After a failed read above, the Redis gauges are left out instead of waiting again.
        if not self.flow.write(out, self.redis if redis_up else None):
            redis_up = 0
        out.family("taskvisor_source_up", "gauge", "1 when the source answered while these metrics were collected, else 0.")
        out.sample("taskvisor_source_up", {"source": "database"}, store_up)
        out.sample("taskvisor_source_up", {"source": "redis"}, redis_up)
        return out.text()

    def queue_lengths(self, providers: list[str]) -> tuple[dict[str, int], int]:
        """Return the queue length of each provider and 1, or no lengths and 0 when Redis failed."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for provider in providers:
                pipe.xlen(self.keys.tasks(provider))
                pipe.hlen(self.keys.busy(provider))
            replies = pipe.execute()
        except redis.RedisError as exc:
            self.warn_limited("queue lengths not read for /metrics", exc)
            return {}, 0
        lengths = {}
        for index, provider in enumerate(providers):
            lengths[provider] = max(0, int(replies[2 * index]) - int(replies[2 * index + 1]))
        return lengths, 1


def _process_labels(slot: Slot) -> dict[str, str]:
    return {"role": slot.role, "provider": slot.provider, "pid": str(slot.pid)}


def describe_exit(slot: Slot) -> str:
    """Describe how the process in an exit record ended, naming the limit of a recycled worker."""
    status = slot.wait_status
    if slot.role == "worker" and os.WIFEXITED(status) and os.WEXITSTATUS(status) in RECYCLE_REASONS:
        return f"recycled after reaching its {RECYCLE_REASONS[os.WEXITSTATUS(status)]} limit"
    return heartbeat.describe_exit(status)
