"""The work of every benchmark task, shared by the taskvisor driver and the peers' tasks.

Each task, whatever system runs it, finishes by incrementing `DONE_KEY`. In latency
mode it first stores `time.time()` under its task number in `STARTED_KEY`, in the
same pipeline, so the harness can compare it with the producer's send time.
The harness reads these keys from the same private Redis that the system uses.
"""

import os
import time

import redis

DONE_KEY = "bench:done"
STARTED_KEY = "bench:started"
SENT_KEY = "bench:sent"


def redis_url() -> str:
    url = os.environ.get("BENCH_REDIS_URL", "")
    if not url.startswith("redis://127.0.0.1:"):
        raise SystemExit(f"BENCH_REDIS_URL must be a loopback redis:// URL set by bench/run.py, got {url!r}")
    return url


def latency_mode() -> bool:
    return os.environ.get("BENCH_MODE") == "latency"


def record_task(client: redis.Redis, number: object, record_start: bool) -> None:
    """Record one finished no-op task; with `record_start`, also its start time."""
    started = time.time()
    pipe = client.pipeline(transaction=False)
    if record_start:
        pipe.hset(STARTED_KEY, str(number), repr(started))
    pipe.incr(DONE_KEY)
    pipe.execute()


class LazyClient:
    """One Redis client per process, made on first use, so that forked children never share a socket."""

    def __init__(self) -> None:
        self.pid = 0
        self.client: redis.Redis | None = None

    def get(self) -> redis.Redis:
        if self.client is None or self.pid != os.getpid():
            self.client = redis.Redis.from_url(redis_url())
            self.pid = os.getpid()
        return self.client
