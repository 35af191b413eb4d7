"""A taskvisor Python driver whose `start` sleeps, for the resize measurement.

It keeps `RUNNING_KEY` at the number of tasks whose driver code runs right now. It
also records in `FIRST_START_KEY` when each worker process started its first task,
so the harness can see when the new workers of a resized provider take work.
"""

import os
import time

import redis

from worker.drivers.base import Driver, TaskContext

RUNNING_KEY = "bench:running"
FIRST_START_KEY = "bench:first-start"
DONE_KEY = "bench:done"


class SleepDriver(Driver):
    """Driver options: `redisUrl` (the benchmark's private Redis) and `seconds` (how long each task sleeps)."""

    def __init__(self, provider: str, options: dict) -> None:
        super().__init__(provider, options)
        self.client = redis.Redis.from_url(options["redisUrl"])
        self.seconds = float(options["seconds"])

    def start(self, context: TaskContext) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(RUNNING_KEY)
        pipe.hsetnx(FIRST_START_KEY, str(os.getpid()), repr(time.time()))
        pipe.execute()
        try:
            # A stop request ends the wait early. The worker then ends the task by the stop's
            # reason, for example back to pending after a shutdown.
            context.cancelled.wait(self.seconds)
        finally:
            pipe = self.client.pipeline(transaction=False)
            pipe.decr(RUNNING_KEY)
            pipe.incr(DONE_KEY)
            pipe.execute()

    def close(self) -> None:
        self.client.close()
