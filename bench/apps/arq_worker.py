"""The arq worker settings of the benchmark: one worker, max_jobs from BENCH_CONCURRENCY (2 by default), no results kept.

An arq worker starts at most max_jobs jobs per poll of its queue and then sleeps for
poll_delay (default 0.5 s), so with max_jobs 2 the default caps it at 4 jobs a
second. The benchmark sets poll_delay to 0.002 s, which caps it at 1,000 jobs a
second with max_jobs 2 (8,000 with max_jobs 16), and an idle worker then reads the
queue 500 times a second.
"""

import asyncio
import time

from arq.connections import RedisSettings
from bench_common import (
    DONE_KEY,
    SLEEP_SECONDS,
    STARTED_KEY,
    concurrency,
    latency_mode,
    record_pid,
    redis_url,
)

_record_start = latency_mode()


async def noop(ctx: dict, number: int) -> None:
    # arq jobs are coroutines, so the record goes through arq's own asyncio client.
    started = time.time()
    pipe = ctx["redis"].pipeline(transaction=False)
    if _record_start:
        pipe.hset(STARTED_KEY, str(number), repr(started))
    pipe.incr(DONE_KEY)
    await pipe.execute()


async def sleep_subprocess(ctx: dict, name: str) -> None:
    """Run `sleep 30` as a child of the worker and wait for it (cancel measurement).

    The job does nothing when it is cancelled: what happens to the child is what arq and
    asyncio do with it.
    """
    process = await asyncio.create_subprocess_exec("sleep", str(SLEEP_SECONDS))
    record_pid(name, process.pid)
    await process.wait()


class WorkerSettings:
    functions = (noop,)
    redis_settings = RedisSettings.from_dsn(redis_url())
    max_jobs = concurrency()
    poll_delay = 0.002
    keep_result = 0


class CancelWorkerSettings:
    """The cancel measurement's worker: `Job.abort()` works only with allow_abort_jobs.

    arq 0.28 reads only the class's own `__dict__` (arq.worker.get_kwargs), so a subclass
    of WorkerSettings would lose redis_settings and connect to arq's default Redis on
    localhost:6379. Every setting is therefore repeated here.
    """

    functions = (noop, sleep_subprocess)
    redis_settings = WorkerSettings.redis_settings
    max_jobs = WorkerSettings.max_jobs
    poll_delay = WorkerSettings.poll_delay
    keep_result = WorkerSettings.keep_result
    allow_abort_jobs = True
