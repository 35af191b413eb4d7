"""A taskvisor Python driver whose `start` does nothing but record itself (see bench_common)."""

import redis
from bench_common import record_task

from worker.drivers.base import Driver, TaskContext


class NoopDriver(Driver):
    """Driver options: `redisUrl` (the benchmark's private Redis) and `recordStart` (latency mode)."""

    def __init__(self, provider: str, options: dict) -> None:
        super().__init__(provider, options)
        self.client = redis.Redis.from_url(options["redisUrl"])
        self.record_start = bool(options.get("recordStart", False))

    def start(self, context: TaskContext) -> None:
        # Task ids are "t-<number>", set by bench/apps/produce.py.
        record_task(self.client, context.task_id.removeprefix("t-"), self.record_start)

    def close(self) -> None:
        self.client.close()
