"""The arq worker settings of the benchmark: one worker with max_jobs 2, results not kept.

An arq worker starts at most max_jobs jobs per poll of its queue and then sleeps for
poll_delay (default 0.5 s), so with max_jobs 2 the default caps it at 4 jobs a
second. The benchmark sets poll_delay to 0.002 s, which caps it at 1,000 jobs a
second, and an idle worker then reads the queue 500 times a second.
"""

import time

from arq.connections import RedisSettings
from bench_common import DONE_KEY, STARTED_KEY, latency_mode, redis_url

_record_start = latency_mode()


async def noop(ctx: dict, number: int) -> None:
    # arq jobs are coroutines, so the record goes through arq's own asyncio client.
    started = time.time()
    pipe = ctx["redis"].pipeline(transaction=False)
    if _record_start:
        pipe.hset(STARTED_KEY, str(number), repr(started))
    pipe.incr(DONE_KEY)
    await pipe.execute()


class WorkerSettings:
    functions = (noop,)
    redis_settings = RedisSettings.from_dsn(redis_url())
    max_jobs = 2
    poll_delay = 0.002
    keep_result = 0
