"""The work of every benchmark task, shared by the taskvisor driver and the peers' tasks.

Each task, whatever system runs it, finishes by incrementing `DONE_KEY`. In latency
mode it first stores `time.time()` under its task number in `STARTED_KEY`, in the
same pipeline, so the harness can compare it with the producer's send time.
The harness reads these keys from the same private Redis that the system uses.

The 30-second tasks of the cancel measurement write the pid of the process they
start (or their own) to a file with `record_pid`, because the harness checks with
psutil when that process is gone.
"""

import os
import time

import redis

DONE_KEY = "bench:done"
STARTED_KEY = "bench:started"
SENT_KEY = "bench:sent"
# The variable that names the folder where the cancel measurement's tasks record their pids.
PID_DIR_VARIABLE = "BENCH_PID_DIR"
# Seconds that each task of the cancel measurement runs when nothing stops it.
SLEEP_SECONDS = 30


def redis_url() -> str:
    url = os.environ.get("BENCH_REDIS_URL", "")
    if not url.startswith("redis://127.0.0.1:"):
        raise SystemExit(f"BENCH_REDIS_URL must be a loopback redis:// URL set by bench/run.py, got {url!r}")
    return url


def latency_mode() -> bool:
    return os.environ.get("BENCH_MODE") == "latency"


def concurrency() -> int:
    """Return the total concurrency that bench/run.py set in BENCH_CONCURRENCY for this run (2 when unset)."""
    text = os.environ.get("BENCH_CONCURRENCY", "2")
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"BENCH_CONCURRENCY must be a whole number of 1 or more, got {text!r}")
    return int(text)


def record_task(client: redis.Redis, number: object, record_start: bool) -> None:
    """Record one finished no-op task; with `record_start`, also its start time."""
    started = time.time()
    pipe = client.pipeline(transaction=False)
    if record_start:
        pipe.hset(STARTED_KEY, str(number), repr(started))
    pipe.incr(DONE_KEY)
    pipe.execute()


def record_pid(name: str, pid: int) -> None:
    """Write "<pid> <time.time()>" to <BENCH_PID_DIR>/<name>.pid, renamed into place so a reader never sees half a file."""
    folder = os.environ[PID_DIR_VARIABLE]
    path = os.path.join(folder, f"{name}.pid")
    with open(path + ".tmp", "w", encoding="ascii") as handle:
        handle.write(f"{pid} {time.time()!r}\n")
    os.replace(path + ".tmp", path)


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
