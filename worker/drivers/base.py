"""The driver interface: how a worker hands one task to a virtualisation backend.

A driver is a class with one method per task type, named after the type with `-`
replaced by `_` (`create`, `start`, `stop`, `restart`, `delete`, `reset`,
`reset_password`). Each method receives a `TaskContext` and either returns a result
(a dict that becomes the task's `result`, or None) or raises `TaskFailed`. Any other
exception also fails the task, with the exception as its error.

A driver may also define `probe(context)`, which asks the backend what became of a
task whose run was interrupted (its worker died, or the supervisor stopped it) and
returns a `ProbeAnswer`. The worker calls it before it runs a non-idempotent task
(create, delete, reset) a second time; see `onInterrupt` in docs/configuration.md.

The worker calls the method in its main thread, and a watchdog thread sets
`context.cancelled` when the task's timeout passes, a cancel arrives or the worker must
shut down. The method must then stop its work and return or raise soon. A method that keeps running past the kill grace gets
its worker process replaced, which is the only way to stop Python code by force.
"""

import threading
import time
from collections.abc import Callable
from typing import Any

from shared.errors import DriverError


class TaskContext:
    """The task a driver method runs, and the channel for its progress reports.

    `data` is the task's `data` object as the producer sent it, secrets included; never
    log it. `deadline` is a `time.monotonic()` value. `cancelled` is set when the task
    must stop, and `stop_reason` then says why: "timeout", "cancel" or "shutdown".
    """

    def __init__(
        self,
        *,
        task_id: str,
        provider: str,
        task_type: str,
        instance: str,
        user: str,
        data: dict,
        timeout: float,
        kill_grace: float,
        report_progress: Callable[[float, str], None],
    ) -> None:
        self.task_id = task_id
        self.provider = provider
        self.task_type = task_type
        self.instance = instance
        self.user = user
        self.data = data
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.deadline = time.monotonic() + timeout
        self.cancelled = threading.Event()
        self.stop_reason: str | None = None
        self._report_progress = report_progress
        self._stop_callbacks: list[Callable[[], None]] = []

    def stop(self, reason: str) -> None:
        """Ask the running driver method to stop; the first reason given is kept."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancelled.set()
        for callback in list(self._stop_callbacks):
            callback()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the thread that requests the stop) when the task must stop.

        A driver that waits in select() or poll() can use it to wake up at once, for
        example by writing to a pipe it watches. The callback must be quick and must not raise.
        """
        self._stop_callbacks.append(callback)
        if self.cancelled.is_set():
            callback()

    def progress(self, percent: float, message: str = "") -> None:
        """Report progress from 0 to 100 with an optional short message."""
        self._report_progress(max(0.0, min(100.0, float(percent))), message)

    def as_json_object(self) -> dict[str, Any]:
        """Return the task as the JSON object a command reads on its stdin."""
        return {
            "id": self.task_id,
            "provider": self.provider,
            "type": self.task_type,
            "instance": self.instance,
            "user": self.user,
            "timeout": self.timeout,
            "data": self.data,
        }


class ProbeAnswer:
    """What a probe found out about an interrupted task.

    `outcome` is one of:
    - "completed": the operation took effect; `result` becomes the task's result.
    - "failed": it did not take effect and must not be run again; `error` explains why.
    - "not_done": nothing happened on the backend, so running the task again is safe.
    """

    OUTCOMES = ("completed", "failed", "not_done")

    def __init__(self, outcome: str, result: dict | None = None, error: str = "") -> None:
        if outcome not in self.OUTCOMES:
            raise ValueError(f"probe outcome {outcome!r} is not one of {', '.join(self.OUTCOMES)}")
        self.outcome = outcome
        self.result = result
        self.error = error

    def __repr__(self) -> str:
        return f"ProbeAnswer({self.outcome!r}, result={self.result!r}, error={self.error!r})"


class Driver:
    """Base class for drivers. `options` is the provider's `driver.options` mapping from the config."""

    def __init__(self, provider: str, options: dict) -> None:
        self.provider = provider
        self.options = options

    def handler_for(self, task_type: str) -> Callable[[TaskContext], dict | None]:
        """Return the method that runs `task_type`, raising DriverError when there is none."""
        method = getattr(self, task_type.replace("-", "_"), None)
        if method is None or not callable(method):
            raise DriverError(f"driver {type(self).__name__} has no method for task type '{task_type}'")
        return method

    def has_probe(self, task_type: str) -> bool:
        """Return whether this driver can probe an interrupted task of `task_type`."""
        return callable(getattr(self, "probe", None))

    def close(self) -> None:
        """Release what the driver holds (connections, sockets) when its worker exits."""
