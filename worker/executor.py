"""Running one task through its driver, under its timeout, and deciding its outcome.

`run_task` is the one place where a task's outcome (completed, failed, timeout,
cancelled, or back to pending) is decided from what the driver did.
"""

import logging
import threading
import time
import traceback
from collections.abc import Callable

import msgspec
import orjson

from shared.errors import DriverError, TaskFailed
from shared.redaction import Redactor
from shared.schema import TaskSpec
from shared.states import TaskStatus
from worker.drivers.base import Driver, TaskContext

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
# How often the waiting loop looks at the deadline and at stop requests, in seconds.
POLL_SECONDS = 0.05
# Extra seconds a driver gets after its kill grace before the worker gives up on it.
STUCK_MARGIN_SECONDS = 2.0
# Seconds without a driver call after which the watchdog sleeps until the next call.
IDLE_SECONDS = 1.0
# Seconds a driver call runs before its `on_long_run` callback is called (see run_task).
LONG_RUN_SECONDS = 1.0


class Outcome(msgspec.Struct):
    status: TaskStatus
    error: str = ""
    message: str = ""
    result: str = ""
    # True when the driver method ignored the stop request; the worker must exit.
    driver_stuck: bool = False
    # False when the driver reported that trying again cannot help
    retryable: bool = True
    # True when an interrupted run is given up, which marks the instance as needing attention
    given_up: bool = False


class _Call:
    def __init__(self, handler: Callable[[TaskContext], dict | None], context: TaskContext) -> None:
        self.handler = handler
        self.context = context
        self.result: dict | None = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self.result = self.handler(self.context)
        except BaseException as exc:  # noqa: BLE001 - decide_outcome turns it into the task's outcome
            self.error = exc


class _Watched:
    """A driver call running in the worker's main thread, with the state that the watchdog keeps for it."""

    def __init__(self, context: TaskContext, shutdown_requested: Callable[[], bool],
                 on_stuck: Callable[[], None], on_long_run: Callable[[float], None] | None = None) -> None:  # fmt: skip
        self.context = context
        self.shutdown_requested = shutdown_requested
        self.on_stuck = on_stuck
        # Called once with the seconds run so far, when the call runs LONG_RUN_SECONDS.
        self.on_long_run = on_long_run
        self.started = time.monotonic()
        # The monotonic time after which a call that got a stop request counts as stuck.
        self.stop_deadline: float | None = None
        self.lock = threading.Lock()
        # "returned" or "abandoned": whichever of the call and the watchdog came first.
        self.settled = ""

    def settle(self, ending: str) -> bool:
        """Record how the call ended; False when the other side had already settled it."""
        with self.lock:
            if self.settled:
                return False
            self.settled = ending
            return True

    def check(self, now: float) -> None:
        """Stop the call at its deadline or on shutdown, and give it up once it ignored the stop too long."""
        context = self.context
        if self.on_long_run is not None and now - self.started >= LONG_RUN_SECONDS:
            on_long_run, self.on_long_run = self.on_long_run, None
            on_long_run(now - self.started)
        if self.stop_deadline is None:
            if now >= context.deadline:
                context.stop("timeout")
            elif self.shutdown_requested():
                context.stop("shutdown")
            if context.cancelled.is_set():
                self.stop_deadline = now + context.kill_grace + STUCK_MARGIN_SECONDS
        elif now >= self.stop_deadline and self.settle("abandoned"):
            self.on_stuck()


class _Watchdog:
    """One thread per worker process that enforces the deadline and stop requests of the running call.

    Driver methods run in the worker's main thread, which saves a hand-off between two
    threads on every task. The watchdog looks at the call every POLL_SECONDS. When no call
    has run for IDLE_SECONDS it sleeps until the next one starts, so that idle workers
    cost no CPU. A call that ignores a stop request is given up: its `on_stuck` records
    the task's end from this thread and ends the process, which is the only way to stop
    Python code by force.
    """

    def __init__(self) -> None:
        self.watched: _Watched | None = None
        self.sleeping = False
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None

    def watch(self, watched: _Watched) -> None:
        self.watched = watched
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="driver-watchdog", daemon=True)
            self.thread.start()
        elif self.sleeping:
            self.wakeup.set()

    def clear(self) -> None:
        self.watched = None

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            watched = self.watched
            now = time.monotonic()
            if watched is not None:
                idle_since = now
                watched.check(now)
            elif now - idle_since >= IDLE_SECONDS:
                self.sleeping = True
                # `watch` sets the call before it looks at `sleeping`, so a call that
                # started meanwhile is seen here and no wake-up is lost.
                if self.watched is None:
                    self.wakeup.wait()
                self.wakeup.clear()
                self.sleeping = False
                idle_since = time.monotonic()
                continue
            time.sleep(POLL_SECONDS)


_watchdog = _Watchdog()


def run_task(
    driver: Driver,
    spec: TaskSpec,
    context: TaskContext,
    redactor: Redactor,
    shutdown_requested: Callable[[], bool],
    on_stuck: Callable[[Outcome], None],
    on_long_run: Callable[[float], None] | None = None,
) -> Outcome:
    """Run the task's driver method in this thread under the watchdog, which enforces the deadline.

    When the deadline passes, or `shutdown_requested()` turns true, the context is
    stopped and the method gets its kill grace to return. A method that ignores the stop
    is given up: the watchdog thread calls `on_stuck` with the task's outcome, and
    `on_stuck` must record it and end the process. When the method runs for
    LONG_RUN_SECONDS, the watchdog thread calls `on_long_run` once with the seconds so far.
    """
    try:
        handler = driver.handler_for(str(spec.type))
    except DriverError as exc:
        return Outcome(TaskStatus.FAILED, error=str(exc))

    def give_up() -> None:
        log.error(
            "driver ignored stop request task_id=%s provider=%s reason=%s",
            spec.id, spec.provider, context.stop_reason,
        )  # fmt: skip
        outcome = _outcome_for_stop(spec, context)
        outcome.driver_stuck = True
        on_stuck(outcome)

    call = _Call(handler, context)
    _run_watched(call, context, shutdown_requested, give_up, on_long_run)
    return decide_outcome(spec, context, call.result, call.error, redactor)


def _run_watched(call: "_Call", context: TaskContext, shutdown_requested: Callable[[], bool],
                 give_up: Callable[[], None], on_long_run: Callable[[float], None] | None = None) -> None:  # fmt: skip
    """Run `call` in this thread while the watchdog enforces its deadline and stop requests.

    When the watchdog gave the call up before it returned, `give_up` ends the process
    from the watchdog thread, so this thread only waits.
    """
    watched = _Watched(context, shutdown_requested, give_up, on_long_run)
    _watchdog.watch(watched)
    try:
        call()
    finally:
        _watchdog.clear()
    if not watched.settle("returned"):
        while True:
            time.sleep(60)


class ProbeOutcome(msgspec.Struct):
    """The result of a driver's probe of an interrupted run, as the worker uses it."""

    # "completed", "failed" or "not_done"; "failed" also when the probe itself failed
    outcome: str
    result: str = ""
    error: str = ""
    driver_stuck: bool = False
    # the stop reason when the probe was stopped (cancel, timeout, shutdown)
    stopped: str = ""


def run_probe(driver: Driver, spec: TaskSpec, context: TaskContext, redactor: Redactor,
              shutdown_requested: Callable[[], bool], on_stuck: Callable[[ProbeOutcome], None]) -> ProbeOutcome:
    """Ask the driver what became of the task's interrupted run, under the task's deadline.

    A probe that ignores a stop request is given up as `run_task` gives up a method, with
    `on_stuck` called from the watchdog thread.
    """

    def give_up() -> None:
        log.error("driver ignored stop request during a probe task_id=%s provider=%s", spec.id, spec.provider)
        on_stuck(ProbeOutcome("failed", error="probe did not stop", driver_stuck=True, stopped=context.stop_reason or ""))

    call = _Call(driver.probe, context)
    _run_watched(call, context, shutdown_requested, give_up)
    secrets = redactor.secret_values(spec.data)
    if context.stop_reason is not None:
        return ProbeOutcome("failed", error=f"probe stopped: {context.stop_reason}", stopped=context.stop_reason)
    if call.error is not None:
        error = call.error
        text = str(error) if isinstance(error, TaskFailed) else f"{type(error).__name__}: {error}"
        return ProbeOutcome("failed", error=redactor.scrub(f"probe failed: {text}", secrets)[:MAX_ERROR_CHARS])
    answer = call.result
    if answer is None or not hasattr(answer, "outcome"):
        return ProbeOutcome("failed", error=f"probe returned {type(answer).__name__}, not a ProbeAnswer")
    result = ""
    if answer.result is not None:
        result = redactor.scrub(orjson.dumps(redactor.redact(answer.result), default=str).decode(), secrets)
    return ProbeOutcome(answer.outcome, result=result, error=redactor.scrub(answer.error, secrets)[:MAX_ERROR_CHARS])


def _outcome_for_stop(spec: TaskSpec, context: TaskContext) -> Outcome:
    if context.stop_reason == "timeout":
        return Outcome(TaskStatus.TIMEOUT, error=f"timed out after {context.timeout:g} s")
    if context.stop_reason == "cancel":
        return Outcome(TaskStatus.CANCELLED, message="cancelled")
    return Outcome(TaskStatus.PENDING, message="interrupted by shutdown; waiting for redelivery")


def decide_outcome(
    spec: TaskSpec,
    context: TaskContext,
    result: dict | None,
    error: BaseException | None,
    redactor: Redactor,
) -> Outcome:
    """Turn what the driver method did into the task's outcome, with secrets removed."""
    secrets = redactor.secret_values(spec.data)
    if error is None:
        text = ""
        if result is not None:
            text = redactor.scrub(orjson.dumps(redactor.redact(result), default=str).decode(), secrets)
        return Outcome(TaskStatus.COMPLETED, result=text)

    if context.stop_reason is not None:
        outcome = _outcome_for_stop(spec, context)
        if outcome.status == TaskStatus.TIMEOUT and isinstance(error, TaskFailed):
            detail = redactor.scrub(str(error), secrets)
            outcome.error = f"{outcome.error}: {detail}"[:MAX_ERROR_CHARS]
        return outcome

    if isinstance(error, TaskFailed):
        message = redactor.scrub(str(error), secrets)
        result_text = ""
        if error.result is not None:
            result_text = redactor.scrub(orjson.dumps(redactor.redact(error.result), default=str).decode(), secrets)
        retryable = error.retry and not (isinstance(error.result, dict) and error.result.get("retry") is False)
        return Outcome(TaskStatus.FAILED, error=message[:MAX_ERROR_CHARS], result=result_text, retryable=retryable)

    trace = redactor.scrub("".join(traceback.format_exception(error)), secrets)
    log.error(
        "driver raised task_id=%s provider=%s type=%s\n%s",
        spec.id, spec.provider, spec.type, trace.rstrip(),
    )  # fmt: skip
    message = redactor.scrub(f"{type(error).__name__}: {error}", secrets)
    return Outcome(TaskStatus.FAILED, error=message[:MAX_ERROR_CHARS])
