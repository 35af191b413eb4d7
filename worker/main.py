"""The worker process: one member of a provider's group, running one task at a time.

A worker reads its provider's task stream through the `workers` consumer group. It
first takes the entries already delivered to its consumer name (work a previous
worker in the same slot left unfinished, or entries the supervisor handed over), then
new ones. Signals:

- SIGTERM finishes the current task and exits.
- SIGUSR2 takes a SIGTERM back while the worker has not left its loop yet.
- SIGUSR1 stops the current task at once and puts it back to pending for redelivery.
- SIGINT is ignored, because the supervisor, not the terminal, decides when workers stop.
"""

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import orjson
import psutil
import redis

from shared import heartbeat
from shared.errors import DriverError, InvalidEntry
from shared.keys import WORKER_GROUP, Keys
from shared.logs import info_line
from shared.redaction import Redactor
from shared.redis_client import connect, ensure_group
from shared.schema import INSTANCE_ID_PATTERN, TaskSpec, parse_entry
from shared.settings import Config
from shared.states import TaskStatus, TaskType, instance_rule_after, instance_rule_given_up
from shared.taskstate import StartResult, TaskState
from worker.drivers import load_driver
from worker.drivers.base import TaskContext
from worker.executor import Outcome, ProbeOutcome, run_probe, run_task
from worker.watchers import CancelWatcher, CurrentTask, renew_leases, send_heartbeats

log = logging.getLogger(__name__)

EXIT_OK = 0
# The worker could not start (driver or Redis setup failed); the supervisor backs off.
EXIT_BOOT_FAILURE = 3
# A driver ignored a stop request; the process exits so that its thread dies with it.
EXIT_DRIVER_STUCK = 4
# After a task, the worker reached its provider's maxTasksPerWorker or maxWorkerMemoryMB
# and exited; the supervisor replaces it at once.
EXIT_RECYCLE_TASKS = 5
EXIT_RECYCLE_MEMORY = 6

# Seconds between looks at entries already delivered to this consumer.
OWN_ENTRIES_INTERVAL = 1.0
# After a start refused because the provider is at its concurrency limit (other
# supervisors' workers run its tasks), seconds before this worker takes new entries.
FULL_BACKOFF_SECONDS = 0.5
FULL_PAUSE_SECONDS = 0.1
# Seconds between looks for automatic retries that are due.
RETRY_CHECK_INTERVAL = 0.5
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
        self.pid = os.getpid()
        self.owner = f"{self.consumer}:{self.pid}"
        self.keys = Keys(config.redis.prefix)
        self.stream = self.keys.tasks(provider)
        self.lease_ms = int(config.supervisor.lease_seconds * 1000)
        self.redactor = Redactor(config.secret_fields)
        self.stopping = False
        self.abort_current = False
        self.current = CurrentTask()
        self.parent_pid = os.getppid()
        self.tasks_done = 0
        # An entry that the end of the last task took for this worker: (entry id, fields, start result or None).
        self.taken_at_finish: tuple[str, dict, StartResult | None] | None = None
        self.next_own_check = 0.0
        self.next_retry_check = 0.0
        self.next_abandoned_check = 0.0
        # Until this monotonic time the provider was last seen at its concurrency limit.
        self.full_until = 0.0
        # Set by `record` when the run just recorded gets an automatic retry, for the log line.
        self.retry_note = ""
        # Recycling limits, 0 for none: tasks done, and resident memory in bytes.
        self.max_tasks = self.settings.max_tasks_per_worker
        self.max_rss_bytes = self.settings.max_worker_memory_mb * 1024 * 1024
        self.process_handle = psutil.Process()

    def make_state(self, client: redis.Redis) -> TaskState:
        redis_settings = self.config.redis
        return TaskState(client, self.keys, redis_settings.events_max_len, redis_settings.dead_max_len, self.redactor)

    # -- process set-up ---------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_abort)
        signal.signal(signal.SIGUSR2, self._on_keep)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_keep(self, signum: int, frame: object) -> None:
        # The supervisor took back a retirement: keep serving, unless a shutdown began.
        if not self.abort_current:
            self.stopping = False

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
        self.state = self.make_state(self.client)
        self.start_arguments = self.state.start_arguments(
            self.provider, self.owner, self.lease_ms,
            {str(task_type): self.interrupt_action(task_type) for task_type in TaskType},
            self.settings.max_interrupted_runs, self.settings.group_size,
        )  # fmt: skip
        threading.Thread(
            target=renew_leases,
            args=(self.make_state(connect(self.config.redis.url)), self.current, self.owner, self.consumer, self.lease_ms),
            name="lease-heartbeat",
            daemon=True,
        ).start()
        CancelWatcher(self.config.redis.url, self.keys, self.make_state, self.current).start()
        threading.Thread(target=send_heartbeats, name="process-heartbeat", daemon=True).start()
        log.info("worker started provider=%s consumer=%s pid=%d", self.provider, self.consumer, os.getpid())
        self.lower_priority(self.config.supervisor.worker_nice)

        code = self.loop()
        # An entry taken and started just before the loop ended (a SIGTERM, a recycling
        # limit) runs to its end like any current task.
        if code != EXIT_DRIVER_STUCK and self.run_taken_at_finish() == EXIT_DRIVER_STUCK:
            code = EXIT_DRIVER_STUCK
        self.driver.close()
        self.log_stopped()
        return code

    def lower_priority(self, levels: int) -> None:
        """Run this process and what it starts `levels` nice levels below the supervisor.

        When the tasks keep every CPU busy, the supervisor's own processes then still get
        their share: the SQL mirror keeps up with the state changes and the health
        endpoint responds. Called after the set-up, which then runs at the supervisor's priority.
        """
        if levels:
            try:
                os.nice(levels)
            except OSError as exc:
                log.warning("failed to lower the worker's priority provider=%s pid=%d worker_nice=%d error=%s",
                            self.provider, os.getpid(), levels, exc)

    def log_stopped(self) -> None:
        log.info("worker stopped provider=%s pid=%d tasks_done=%d", self.provider, os.getpid(), self.tasks_done)

    # -- main loop --------------------------------------------------------------

    def loop(self) -> int:
        self.next_own_check = 0.0
        self.next_retry_check = 0.0
        self.next_abandoned_check = time.monotonic() + self.config.supervisor.lease_seconds / 2
        backoff = 0.5
        checked_tasks = 0
        while not self.stopping:
            heartbeat.note_loop()
            if self.tasks_done != checked_tasks:
                checked_tasks = self.tasks_done
                if code := self.recycle_code():
                    return code
            if os.getppid() != self.parent_pid:
                log.warning("supervisor is gone; worker exits provider=%s pid=%d", self.provider, os.getpid())
                break
            try:
                if self.taken_at_finish is not None:
                    # Started by the end of a task that the checks below ran.
                    if self.run_taken_at_finish() == EXIT_DRIVER_STUCK:
                        return EXIT_DRIVER_STUCK
                    continue
                if time.monotonic() >= self.next_abandoned_check:
                    self.next_abandoned_check = time.monotonic() + self.config.supervisor.lease_seconds / 2
                    claimed = self.state.claim_abandoned(self.provider, self.consumer, self.lease_ms)
                    if claimed:
                        log.info("abandoned entries claimed provider=%s count=%d consumer=%s", self.provider, claimed, self.consumer)
                        self.next_own_check = 0.0
                if time.monotonic() >= self.next_own_check:
                    self.next_own_check = time.monotonic() + OWN_ENTRIES_INTERVAL
                    for entry_id, fields in self.read_own_entries():
                        if self.stopping or self.run_entry(entry_id, fields) == EXIT_DRIVER_STUCK:
                            return EXIT_OK if self.stopping else EXIT_DRIVER_STUCK
                        if code := self.recycle_code():
                            return code
                if time.monotonic() >= self.next_retry_check:
                    self.next_retry_check = time.monotonic() + RETRY_CHECK_INTERVAL
                    due = self.state.take_due_retry(self.provider, self.consumer)
                    if isinstance(due, tuple):
                        self.next_retry_check = 0.0
                        if self.run_entry(*due) == EXIT_DRIVER_STUCK:
                            return EXIT_DRIVER_STUCK
                        continue
                if time.monotonic() < self.full_until:
                    # The provider is at its limit: take no new entries, which would only
                    # pile up undone here, and look at this consumer's own entries again soon.
                    time.sleep(FULL_PAUSE_SECONDS)
                    self.next_own_check = min(self.next_own_check, self.full_until)
                    continue
                taken = self.state.take(self.provider, self.consumer, self.start_arguments)
                if isinstance(taken, str):
                    # Nothing new: wait until an entry newer than the newest one arrives.
                    self.client.xread({self.stream: taken}, count=1, block=READ_BLOCK_MS)
                elif self.run_taken(*taken) == EXIT_DRIVER_STUCK:
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

    def may_take_next(self) -> bool:
        """Return True when the end of the current task may take and start the next entry in the same step.

        Not while the main loop has a check due (entries already delivered here, due
        retries, abandoned entries), the provider is at its limit, or this worker is about
        to recycle, because the loop must run those first.
        """
        now = time.monotonic()
        if now >= min(self.next_own_check, self.next_retry_check, self.next_abandoned_check) or now < self.full_until:
            return False
        if self.max_tasks and self.tasks_done + 1 >= self.max_tasks:
            return False
        return not self.max_rss_bytes or self.process_handle.memory_info().rss <= self.max_rss_bytes

    def recycle_code(self) -> int:
        """Return the exit code that recycles this worker when it reached a limit, else 0.

        Called between tasks only, so a recycled worker leaves no task behind. Entries
        already delivered to its consumer name go to its replacement, which has the same name.
        A worker that has run no task never recycles, so a memory limit below a fresh
        worker's size cannot make the supervisor replace workers in a loop.
        """
        if self.tasks_done == 0:
            return 0
        if self.max_tasks and self.tasks_done >= self.max_tasks:
            log.info(
                "worker recycling provider=%s pid=%d reason=maxTasksPerWorker tasks_done=%d limit=%d",
                self.provider, os.getpid(), self.tasks_done, self.max_tasks,
            )  # fmt: skip
            return EXIT_RECYCLE_TASKS
        if self.max_rss_bytes:
            rss = self.process_handle.memory_info().rss
            if rss > self.max_rss_bytes:
                log.info(
                    "worker recycling provider=%s pid=%d reason=maxWorkerMemoryMB rss_mb=%.0f limit_mb=%d tasks_done=%d",
                    self.provider, os.getpid(), rss / 1048576, self.max_rss_bytes // 1048576, self.tasks_done,
                )  # fmt: skip
                return EXIT_RECYCLE_MEMORY
        return 0

    def read_own_entries(self) -> list[tuple[str, dict | None]]:
        """Return the entries already delivered to this consumer and not yet finished."""
        reply = self.client.xreadgroup(WORKER_GROUP, self.consumer, {self.stream: "0"}, count=20)
        entries = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields))
        return entries

    def run_taken(self, entry_id: str, fields: dict, started: StartResult | None) -> int:
        """Run an entry that `take` delivered, then each entry that the end of a task took next.

        A task's end takes the stream's next entry for this worker only while no check of
        the main loop is due (see `may_take_next`), so the loop still runs its checks on time.
        """
        return self.run_taken_at_finish(self.run_one_taken(entry_id, fields, started))

    def run_taken_at_finish(self, code: int = EXIT_OK) -> int:
        """Run each entry that the end of a task took for this worker, while the runs end with EXIT_OK."""
        while code == EXIT_OK and self.taken_at_finish is not None:
            taken, self.taken_at_finish = self.taken_at_finish, None
            code = self.run_one_taken(*taken)
        return code

    def run_one_taken(self, entry_id: str, fields: dict, started: StartResult | None) -> int:
        """Run an entry delivered by `take` or by the end of the previous task, started too when registered."""
        if started is not None and started.outcome == "unregistered":
            # Taken before the intake registered it, the usual case at idle workers: the
            # worker registers it itself.
            return self.run_after(*self.process(entry_id, fields, unregistered=True))
        if started is None or not started.owned:
            # Not started in the take (not startable now): the usual path looks at it
            # again and handles every reply.
            return self.run_entry(entry_id, fields)
        try:
            spec = parse_entry(self.provider, entry_id, fields)
        except InvalidEntry as exc:
            # Only a registered task is started in the take, and the intake registers only
            # valid entries, so this means the entry and the task disagree.
            log.error("started task has an invalid entry provider=%s entry=%s error=%s", self.provider, entry_id, exc)
            return self.run_entry(entry_id, fields)
        timeout = spec.timeout or self.settings.timeout_for(spec.type)
        return self.run_after(*self.execute(spec, timeout, started))

    def run_after(self, code: int, handed_over: tuple[str, dict] | None) -> int:
        """Go on with the entry handed over after a task ended, unless the worker must exit."""
        if code != EXIT_OK or handed_over is None:
            return code
        return self.run_entry(*handed_over)

    def run_entry(self, entry_id: str, fields: dict | None) -> int:
        """Process one entry, then the tasks of the same instance handed over after it."""
        next_entry: tuple[str, dict | None] | None = (entry_id, fields)
        while next_entry is not None:
            code, next_entry = self.process(*next_entry)
            if code != EXIT_OK:
                return code
        return EXIT_OK

    # -- one entry --------------------------------------------------------------

    def process(
        self, entry_id: str, fields: dict | None, unregistered: bool = False
    ) -> tuple[int, tuple[str, dict] | None]:
        """Validate, start and run one entry; returns the exit code and a handed-over entry."""
        if not fields:
            # Deleted after delivery (a finished task); only the acknowledgement is left to do.
            self.client.xack(self.stream, WORKER_GROUP, entry_id)
            return EXIT_OK, None
        try:
            spec = parse_entry(self.provider, entry_id, fields)
        except InvalidEntry as exc:
            self.state.dead_letter(self.provider, entry_id, fields, str(exc), record_task=True)
            return EXIT_OK, None
        timeout = spec.timeout or self.settings.timeout_for(spec.type)
        # Usually the intake has registered the task and reserved its id, so one round trip
        # suffices. Otherwise the id is reserved here and the start registers the task.
        if unregistered:
            # The take already found the task unregistered: skip that first attempt.
            started = StartResult([b"unregistered"])
        else:
            started = self.start(spec, timeout, registered_only=True)
        if started.outcome == "unregistered":
            # On one Redis server the start reserves the id itself and replies "duplicate"
            # when another entry has it. On a cluster the index is in another slot.
            first_owner = None if self.state.one_server else self.state.claim_id(spec)
            if first_owner is not None:
                reason = f"duplicate task id '{spec.id}': already used by entry {first_owner}"
                self.state.dead_letter(self.provider, entry_id, fields, reason)
                return EXIT_OK, None
            started = self.start(spec, timeout)
        if started.outcome == "cancel_requested":
            self.state.cancel(self.provider, spec.id, stored=True)
            started = self.start(spec, timeout)
        if started.outcome == "duplicate":
            reason = f"duplicate task id '{spec.id}': already used by entry {started.detail}"
            self.state.dead_letter(self.provider, entry_id, fields, reason)
            return EXIT_OK, None
        if started.outcome == "interrupted":
            log.warning(
                "interrupted task given up task_id=%s provider=%s type=%s reason=%s",
                spec.id, self.provider, spec.type, started.detail,
            )  # fmt: skip
            return EXIT_OK, None
        if started.outcome == "full":
            self.full_until = time.monotonic() + FULL_BACKOFF_SECONDS
        if not started.owned:
            # "busy", "wait", "full", "delayed" or "finished": another worker runs it, an
            # earlier task of the same instance runs first, the provider is at its limit,
            # its retry is not due, or it has ended. The others than "finished" stay
            # delivered to this consumer and are looked at again on a later pass.
            log.debug("task not started task_id=%s provider=%s outcome=%s detail=%s", spec.id, self.provider, started.outcome, started.detail)
            return EXIT_OK, None
        return self.execute(spec, timeout, started)

    def start(self, spec: TaskSpec, timeout: float, registered_only: bool = False) -> StartResult:
        return self.state.start(
            spec, timeout, self.owner, self.lease_ms, registered_only=registered_only,
            on_interrupt=self.interrupt_action(spec.type), poison_runs=self.settings.max_interrupted_runs,
            limit=self.settings.group_size,
        )  # fmt: skip

    def interrupt_action(self, task_type: TaskType) -> str:
        """Return the action for an interrupted run of `task_type`: the provider's rule, or fail without a probe."""
        action = self.settings.interrupt_action_for(task_type)
        if action == "probe" and not self.driver.has_probe(str(task_type)):
            action = "fail"
        return action

    def execute(self, spec: TaskSpec, timeout: float, started: StartResult) -> tuple[int, tuple[str, dict] | None]:
        """Run a task that this worker owns, and record its end.

        The worker logs one line when a task ends. A task that runs for a second or longer,
        or that begins with a probe, also gets a line while it runs. A backlog of quick
        tasks thus costs the worker one line per task instead of two.
        """
        begun = time.monotonic()

        def log_running(seconds: float) -> None:
            log.info(
                "task running task_id=%s provider=%s type=%s instance=%s attempt=%d pid=%d seconds=%.1f",
                spec.id, self.provider, spec.type, spec.instance or "-", started.attempts, self.pid, seconds,
            )  # fmt: skip

        if started.outcome == "probe":
            log.info(
                "task started task_id=%s provider=%s type=%s instance=%s attempt=%d pid=%d probe=first",
                spec.id, self.provider, spec.type, spec.instance or "-", started.attempts, self.pid,
            )  # fmt: skip
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
        self.current.set(spec, context)
        heartbeat.beat(task_started_at=time.time())

        def end_stuck(outcome: Outcome) -> None:
            # The watchdog thread calls this while the driver's method still runs in the
            # main thread. Exiting after recording the task's end stops that method.
            self.complete(spec, outcome, started, begun)
            self.log_stopped()
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_DRIVER_STUCK)

        outcome = None
        if started.outcome == "probe":
            outcome = self.probe(spec, context, end_stuck)
        if outcome is None:
            outcome = run_task(self.driver, spec, context, self.redactor, lambda: self.abort_current, end_stuck,
                               on_long_run=log_running)  # fmt: skip
        handed_over = self.complete(spec, outcome, started, begun)
        return (EXIT_DRIVER_STUCK if outcome.driver_stuck else EXIT_OK), handed_over

    def complete(self, spec: TaskSpec, outcome: Outcome, started: StartResult, begun: float) -> tuple[str, dict] | None:
        """Record a run's outcome and log the task's end; returns the entry handed over, if any."""
        self.retry_note = ""
        self.current.ending = True
        handed_over = self.record(spec, outcome, started.retries)
        self.current.set(None, None)
        if outcome.status != TaskStatus.PENDING:
            # A run that a shutdown stopped is not counted: its task runs again later.
            self.tasks_done += 1
        heartbeat.beat(task_started_at=0.0, tasks_done=self.tasks_done)
        # A run that gets an automatic retry, or that a shutdown stopped, is logged as a run:
        # the task has not ended.
        if self.retry_note:
            headline = "task run failed; retry scheduled"
        elif outcome.status == TaskStatus.PENDING:
            headline = "task run stopped by shutdown; back to pending"
        else:
            headline = "task ended"
        line = (
            f"{headline} task_id={spec.id} provider={self.provider} type={spec.type} instance={spec.instance or '-'}"
            f" attempt={started.attempts} status={outcome.status} seconds={time.monotonic() - begun:.3f}"
            f" pid={self.pid}{self.retry_note}{f' error={outcome.error!r}' if outcome.error else ''}"
        )
        if outcome.status in (TaskStatus.COMPLETED, TaskStatus.CANCELLED):
            info_line(log, line)
        else:
            log.warning("%s", line)
        return handed_over

    def probe(self, spec: TaskSpec, context: TaskContext, end_stuck: Callable[[Outcome], None]) -> Outcome | None:
        """Ask the driver what the interrupted run did; None when the task should run now."""

        def probe_stuck(answer: ProbeOutcome) -> None:
            end_stuck(_outcome_of_probe(answer) or Outcome(TaskStatus.FAILED, error=answer.error, driver_stuck=True))

        answer = run_probe(self.driver, spec, context, self.redactor, lambda: self.abort_current, probe_stuck)
        log.info(
            "probe answered task_id=%s provider=%s type=%s outcome=%s%s",
            spec.id, self.provider, spec.type, answer.outcome, f" error={answer.error!r}" if answer.error else "",
        )  # fmt: skip
        outcome = _outcome_of_probe(answer)
        if outcome is None:
            context.progress(0, "the interrupted run had not taken effect (probe); running it again")
        return outcome

    def record(self, spec: TaskSpec, outcome: Outcome, retries_done: int = 0) -> tuple[str, dict] | None:
        """Write the outcome, retrying while Redis is unreachable; the task must not be lost.

        A failure or timeout that the provider's `maxRetries` allows goes back to pending
        with an automatic retry scheduled. Returns the next entry of the same instance
        when it was handed to this worker.
        """
        fields = {"error": outcome.error, "message": outcome.message, "result": outcome.result}
        status = outcome.status
        retry_due_ms = None
        instance_rule = None
        if outcome.given_up:
            instance_rule = instance_rule_given_up(spec.type)
        if status == TaskStatus.PENDING:
            # Stopped by a shutdown: the next start treats the run as interrupted.
            fields["interrupted"] = "1"
        elif status in (TaskStatus.FAILED, TaskStatus.TIMEOUT) and outcome.retryable and not self.stopping:
            allowed = self.settings.retries_for(spec.type)
            if retries_done < allowed:
                delay = self.settings.retry_delay(retries_done + 1)
                retry_due_ms = int((time.time() + delay) * 1000)
                self.retry_note = f" retry={retries_done + 1}/{allowed} retry_in={delay:g}s"
                fields["message"] = (
                    f"{status}; automatic retry {retries_done + 1} of {allowed} in {delay:g} s"
                )
                status = TaskStatus.PENDING
                instance_rule = instance_rule_after(spec.type, TaskStatus.PENDING)
        if outcome.status == TaskStatus.COMPLETED:
            fields["progress"] = "100"
        if spec.type == "create" and not spec.instance and outcome.result:
            instance = _instance_from_result(outcome.result)
            if instance:
                fields["instance"] = instance
        handoff = "" if self.stopping or outcome.driver_stuck else self.consumer
        take_next = self.start_arguments if handoff and self.may_take_next() else None
        delay = 0.5
        while True:
            try:
                result = self.state.finish(spec, self.owner, status, fields, handoff, retry_due_ms, instance_rule, take_next)
                self.taken_at_finish = result.taken_entry
                return result.handed_over
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


def _outcome_of_probe(answer: ProbeOutcome) -> Outcome | None:
    """Turn a probe's reply into the task's outcome; None when the task should run now."""
    if answer.stopped:
        # Stopped by a cancel, the deadline or a shutdown: ended as any run is.
        status = {"cancel": TaskStatus.CANCELLED, "timeout": TaskStatus.TIMEOUT}.get(answer.stopped, TaskStatus.PENDING)
        return Outcome(status, error=answer.error if status == TaskStatus.TIMEOUT else "",
                       message=f"probe stopped: {answer.stopped}", driver_stuck=answer.driver_stuck)
    if answer.outcome == "completed":
        return Outcome(TaskStatus.COMPLETED, result=answer.result, message="the interrupted run had completed (probe)")
    if answer.outcome == "failed":
        return Outcome(TaskStatus.FAILED, error=f"interrupted; {answer.error or 'the probe found it had not taken effect'}",
                       message="interrupted", retryable=False, given_up=True)
    return None


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
