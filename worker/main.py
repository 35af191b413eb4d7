"""The worker process: one member of a provider's group, running one task at a time.

A worker reads its provider's task stream through the `workers` consumer group. It
first takes the entries already delivered to its consumer name (work a previous
worker in the same slot left unfinished, or entries the supervisor handed over), then
new ones. Signals: SIGTERM finishes the current task and exits; SIGUSR1 stops the
current task at once and puts it back to pending for redelivery; SIGINT is ignored
because the supervisor, not the terminal, decides when workers stop.
"""

import logging
import os
import signal
import threading
import time

import orjson
import redis

from shared.errors import DriverError, InvalidEntry
from shared.keys import WORKER_GROUP, Keys
from shared.redaction import Redactor
from shared.redis_client import connect, ensure_group
from shared.schema import INSTANCE_ID_PATTERN, TaskSpec, parse_entry
from shared.settings import Config
from shared.states import TaskStatus, instance_rule_after, instance_rule_while_running
from shared.taskstate import TaskState
from worker.drivers import load_driver
from worker.drivers.base import TaskContext
from worker.executor import Outcome, run_task

log = logging.getLogger(__name__)

EXIT_OK = 0
# The worker could not start (driver or Redis setup failed); the supervisor backs off.
EXIT_BOOT_FAILURE = 3
# A driver ignored a stop request; the process exits so that its thread dies with it.
EXIT_DRIVER_STUCK = 4

# Seconds between looks at entries already delivered to this consumer.
OWN_ENTRIES_INTERVAL = 1.0
READ_BLOCK_MS = 1000
# Minimum seconds between two progress writes of one task; reports in between are
# dropped, except a report of 100 %.
PROGRESS_INTERVAL = 0.2


def consumer_name(supervisor_name: str, provider: str, slot: int) -> str:
    return f"{supervisor_name}-{provider}-{slot}"


class Worker:
    def __init__(self, config: Config, provider: str, slot: int) -> None:
        self.config = config
        self.provider = provider
        self.settings = config.providers[provider]
        self.consumer = consumer_name(config.supervisor.name, provider, slot)
        self.owner = f"{self.consumer}:{os.getpid()}"
        self.keys = Keys(config.redis.prefix)
        self.stream = self.keys.tasks(provider)
        self.lease_ms = int(config.supervisor.lease_seconds * 1000)
        self.redactor = Redactor(config.secret_fields)
        self.stopping = False
        self.abort_current = False
        self.current: TaskSpec | None = None
        self.parent_pid = os.getppid()
        self.tasks_done = 0

    # -- process set-up ---------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_abort)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_abort(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.abort_current = True

    def run(self) -> int:
        self.install_signals()
        try:
            self.driver = load_driver(self.provider, self.settings.driver, self.config.base_dir)
            self.client = connect(self.config.redis.url)
            ensure_group(self.client, self.stream, WORKER_GROUP)
        except (DriverError, redis.RedisError) as exc:
            log.error("worker failed to start provider=%s pid=%d error=%s", self.provider, os.getpid(), exc)
            return EXIT_BOOT_FAILURE
        self.state = TaskState(
            self.client, self.keys, self.config.redis.events_max_len, self.config.redis.dead_max_len, self.redactor
        )
        threading.Thread(target=self._renew_leases, name="lease-heartbeat", daemon=True).start()
        log.info("worker started provider=%s consumer=%s pid=%d", self.provider, self.consumer, os.getpid())

        code = self.loop()
        self.driver.close()
        log.info("worker stopped provider=%s pid=%d tasks_done=%d", self.provider, os.getpid(), self.tasks_done)
        return code

    # -- main loop --------------------------------------------------------------

    def loop(self) -> int:
        next_own_check = 0.0
        next_abandoned_check = time.monotonic() + self.config.supervisor.lease_seconds / 2
        backoff = 0.5
        while not self.stopping:
            if os.getppid() != self.parent_pid:
                log.warning("supervisor is gone; worker exits provider=%s pid=%d", self.provider, os.getpid())
                break
            try:
                if time.monotonic() >= next_abandoned_check:
                    next_abandoned_check = time.monotonic() + self.config.supervisor.lease_seconds / 2
                    claimed = self.state.claim_abandoned(self.provider, self.consumer, self.lease_ms)
                    if claimed:
                        log.info("abandoned entries claimed provider=%s count=%d consumer=%s", self.provider, claimed, self.consumer)
                        next_own_check = 0.0
                if time.monotonic() >= next_own_check:
                    next_own_check = time.monotonic() + OWN_ENTRIES_INTERVAL
                    for entry_id, fields in self.read(own=True):
                        if self.stopping:
                            break
                        if self.process(entry_id, fields) == EXIT_DRIVER_STUCK:
                            return EXIT_DRIVER_STUCK
                for entry_id, fields in self.read(own=False):
                    if self.process(entry_id, fields) == EXIT_DRIVER_STUCK:
                        return EXIT_DRIVER_STUCK
                backoff = 0.5
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group missing, creating it provider=%s stream=%s", self.provider, self.stream)
                ensure_group(self.client, self.stream, WORKER_GROUP)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable provider=%s pid=%d retry_in=%.1fs error=%s", self.provider, os.getpid(), backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        return EXIT_OK

    def read(self, own: bool) -> list[tuple[str, dict | None]]:
        """Read entries: those already delivered to this consumer, or one new one."""
        if own:
            reply = self.client.xreadgroup(WORKER_GROUP, self.consumer, {self.stream: "0"}, count=20)
        else:
            reply = self.client.xreadgroup(WORKER_GROUP, self.consumer, {self.stream: ">"}, count=1, block=READ_BLOCK_MS)
        entries = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields))
        return entries

    # -- one entry --------------------------------------------------------------

    def process(self, entry_id: str, fields: dict | None) -> int:
        if not fields:
            # Deleted after delivery (a finished task); only the acknowledgement is left to do.
            self.client.xack(self.stream, WORKER_GROUP, entry_id)
            return EXIT_OK
        try:
            spec = parse_entry(self.provider, entry_id, fields)
        except InvalidEntry as exc:
            self.state.dead_letter(self.provider, entry_id, fields, str(exc))
            return EXIT_OK
        first_owner = self.state.claim_id(spec)
        if first_owner is not None:
            reason = f"duplicate task id '{spec.id}': already used by entry {first_owner}"
            self.state.dead_letter(self.provider, entry_id, fields, reason)
            return EXIT_OK

        timeout = spec.timeout or self.settings.timeout_for(spec.type)
        started = self.state.start(spec, timeout, self.owner, self.lease_ms, instance_rule_while_running(spec.type))
        if started.outcome == "finished":
            self.client.xack(self.stream, WORKER_GROUP, entry_id)
            self.client.xdel(self.stream, entry_id)
            return EXIT_OK
        if started.outcome == "duplicate":
            reason = f"duplicate task id '{spec.id}': already used by entry {started.detail}"
            self.state.dead_letter(self.provider, entry_id, fields, reason)
            return EXIT_OK
        if started.outcome != "ok":
            # "busy" or "cancelling": another worker holds it; look again on the next pass.
            log.debug("task held elsewhere task_id=%s provider=%s outcome=%s", spec.id, self.provider, started.outcome)
            return EXIT_OK

        return self.execute(spec, timeout, started.attempts)

    def execute(self, spec: TaskSpec, timeout: float, attempt: int) -> int:
        log.info(
            "task started task_id=%s provider=%s type=%s instance=%s attempt=%d pid=%d",
            spec.id, self.provider, spec.type, spec.instance or "-", attempt, os.getpid(),
        )  # fmt: skip
        begun = time.monotonic()
        self.current = spec
        context = TaskContext(
            task_id=spec.id,
            provider=self.provider,
            task_type=str(spec.type),
            instance=spec.instance,
            user=spec.user,
            data=spec.data,
            timeout=timeout,
            kill_grace=self.settings.driver.kill_grace,
            report_progress=self._progress_reporter(spec),
        )
        outcome = run_task(self.driver, spec, context, self.redactor, lambda: self.abort_current)
        self.record(spec, outcome)
        self.current = None
        self.tasks_done += 1
        log.info(
            "task ended task_id=%s provider=%s type=%s status=%s seconds=%.3f pid=%d%s",
            spec.id, self.provider, spec.type, outcome.status, time.monotonic() - begun, os.getpid(),
            f" error={outcome.error!r}" if outcome.error else "",
        )  # fmt: skip
        return EXIT_DRIVER_STUCK if outcome.driver_stuck else EXIT_OK

    def record(self, spec: TaskSpec, outcome: Outcome) -> None:
        """Write the outcome, retrying while Redis is unreachable; the task must not be lost."""
        fields = {"error": outcome.error, "message": outcome.message, "result": outcome.result}
        if outcome.status == TaskStatus.COMPLETED:
            fields["progress"] = "100"
        if spec.type == "create" and not spec.instance and outcome.result:
            instance = _instance_from_result(outcome.result)
            if instance:
                fields["instance"] = instance
        rule = instance_rule_after(spec.type, outcome.status)
        delay = 0.5
        while True:
            try:
                self.state.finish(spec, self.owner, outcome.status, rule, fields)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable while recording task_id=%s provider=%s retry_in=%.1fs error=%s", spec.id, self.provider, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _progress_reporter(self, spec: TaskSpec):
        last_sent = [0.0]

        def report(percent: float, message: str) -> None:
            now = time.monotonic()
            if now - last_sent[0] < PROGRESS_INTERVAL and percent < 100:
                return
            last_sent[0] = now
            secrets = self.redactor.secret_values(spec.data)
            text = self.redactor.scrub(message, secrets)[:500]
            try:
                self.state.report_progress(spec, self.owner, percent, text, self.lease_ms)
            except redis.RedisError as exc:
                log.warning("progress not recorded task_id=%s provider=%s error=%s", spec.id, self.provider, exc)

        return report

    def _renew_leases(self) -> None:
        interval = self.config.supervisor.lease_seconds / 3
        while True:
            time.sleep(interval)
            spec = self.current
            if spec is None:
                continue
            try:
                if not self.state.renew_lease(spec, self.owner, self.consumer, self.lease_ms):
                    log.warning("lease lost task_id=%s provider=%s pid=%d", spec.id, self.provider, os.getpid())
            except redis.RedisError as exc:
                log.warning("lease renewal failed task_id=%s provider=%s error=%s", spec.id, self.provider, exc)


def _instance_from_result(result_text: str) -> str:
    """Return the instance id a create task's result names, if it is a valid one."""
    try:
        value = orjson.loads(result_text)
    except orjson.JSONDecodeError:
        return ""
    instance = value.get("instance") if isinstance(value, dict) else None
    if isinstance(instance, str) and INSTANCE_ID_PATTERN.match(instance):
        return instance
    return ""


def worker_main(config: Config, provider: str, slot: int) -> int:
    """Entry point in a freshly forked child; returns the process exit code."""
    return Worker(config, provider, slot).run()
