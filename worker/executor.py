"""Running one task through its driver, under its timeout, and deciding its outcome.

`run_task` is the one place where a task's outcome (completed, failed, timeout,
cancelled, or back to pending) is decided from what the driver did.
"""

import logging
import queue
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
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.error = exc


class _DriverThread:
    """One long-lived thread per worker process that runs driver methods, one at a time.

    Starting a thread for every task cost a fifth of a busy worker's time. A worker
    whose driver ignores a stop request exits, so a stuck thread never blocks a
    later task.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def run(self, call: _Call) -> threading.Event:
        """Queue `call` and return an event that is set when it has returned."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="driver", daemon=True)
            self.thread.start()
        done = threading.Event()
        self.calls.put((call, done))
        return done

    def _loop(self) -> None:
        while True:
            call, done = self.calls.get()
            call()
            done.set()


_driver_thread = _DriverThread()


def run_task(
    driver: Driver,
    spec: TaskSpec,
    context: TaskContext,
    redactor: Redactor,
    shutdown_requested: Callable[[], bool],
) -> Outcome:
    """Run the task's driver method in a thread and wait for it, enforcing the deadline.

    When the deadline passes, or `shutdown_requested()` turns true, the context is
    stopped and the method gets its kill grace to return.
    """
    try:
        handler = driver.handler_for(str(spec.type))
    except DriverError as exc:
        return Outcome(TaskStatus.FAILED, error=str(exc))

    call = _Call(handler, context)
    if not _wait_for_call(call, context, shutdown_requested):
        log.error(
            "driver ignored stop request task_id=%s provider=%s reason=%s",
            spec.id, spec.provider, context.stop_reason,
        )  # fmt: skip
        outcome = _outcome_for_stop(spec, context)
        outcome.driver_stuck = True
        return outcome
    return decide_outcome(spec, context, call.result, call.error, redactor)


def _wait_for_call(call: "_Call", context: TaskContext, shutdown_requested: Callable[[], bool]) -> bool:
    """Run `call` in the driver thread and wait for it; False when it ignored a stop request.

    When the deadline passes, or `shutdown_requested()` turns true, the context is
    stopped and the call gets its kill grace to return.
    """
    done = _driver_thread.run(call)
    stop_deadline: float | None = None
    while not done.wait(POLL_SECONDS):
        now = time.monotonic()
        if stop_deadline is None:
            if now >= context.deadline:
                context.stop("timeout")
            elif shutdown_requested():
                context.stop("shutdown")
            if context.cancelled.is_set():
                stop_deadline = now + context.kill_grace + STUCK_MARGIN_SECONDS
        elif now >= stop_deadline:
            return False
    return True


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
              shutdown_requested: Callable[[], bool]) -> ProbeOutcome:
    """Ask the driver what became of the task's interrupted run, under the task's deadline."""
    call = _Call(driver.probe, context)
    if not _wait_for_call(call, context, shutdown_requested):
        log.error("driver ignored stop request during a probe task_id=%s provider=%s", spec.id, spec.provider)
        return ProbeOutcome("failed", error="probe did not stop", driver_stuck=True, stopped=context.stop_reason or "")
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
