"""The Celery app of the benchmark: Redis broker, late acknowledgement, no result backend."""

import os
import subprocess
import time

from bench_common import (
    SLEEP_SECONDS,
    LazyClient,
    latency_mode,
    record_pid,
    record_task,
    redis_url,
)
from celery import Celery

app = Celery("bench", broker=redis_url())
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    result_backend=None,
    broker_connection_retry_on_startup=True,
)

_client = LazyClient()
_record_start = latency_mode()


@app.task(name="bench.noop")
def noop(number: int) -> None:
    record_task(_client.get(), number, _record_start)


@app.task(name="bench.sleep_subprocess")
def sleep_subprocess(name: str) -> None:
    """Run `sleep 30` as a child of the pool process, as a panel task runs a script (cancel measurement)."""
    process = subprocess.Popen(["sleep", str(SLEEP_SECONDS)])
    record_pid(name, process.pid)
    process.wait()


@app.task(name="bench.sleep_in_pool")
def sleep_in_pool(name: str) -> None:
    """Sleep 30 s in the pool process itself (cancel measurement)."""
    record_pid(name, os.getpid())
    time.sleep(SLEEP_SECONDS)
