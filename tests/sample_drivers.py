"""Python drivers used by the tests through `type: "tests.sample_drivers:Class"`."""

import os
import time

from shared.errors import TaskFailed
from worker.drivers.base import Driver, TaskContext


class SleepyDriver(Driver):
    """Sleeps for data.seconds in small steps, reporting progress, and honours a stop request."""

    def start(self, context: TaskContext) -> dict:
        seconds = float(context.data.get("seconds", 0.2))
        steps = 10
        for step in range(steps):
            if context.cancelled.wait(seconds / steps):
                raise TaskFailed(f"stopped at step {step}")
            context.progress((step + 1) * 100 / steps, f"step {step + 1}")
        return {"slept": seconds, "pid": os.getpid(), "option": self.options.get("label", "")}

    def stop(self, context: TaskContext) -> None:
        raise ValueError("the hypervisor API returned 500")

    def delete(self, context: TaskContext) -> None:
        raise TaskFailed("instance is locked by a backup job", result={"lock": "backup"})


class StubbornDriver(Driver):
    """Ignores stop requests: only replacing its worker process can end it."""

    def start(self, context: TaskContext) -> None:
        time.sleep(3600)

    def stop(self, context: TaskContext) -> dict:
        return {"pid": os.getpid()}


class StubbornProbeDriver(Driver):
    """Creates by waiting until stopped, and probes an interrupted create by ignoring every stop request."""

    def create(self, context: TaskContext) -> None:
        context.cancelled.wait(3600)
        raise TaskFailed("stopped")

    def probe(self, context: TaskContext) -> None:
        time.sleep(3600)
