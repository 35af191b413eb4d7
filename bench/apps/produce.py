"""Enqueue benchmark tasks through one system's own client.

    produce.py SYSTEM backlog COUNT [--first N]
    produce.py SYSTEM paced COUNT INTERVAL_MS [--first N]

`backlog` enqueues COUNT tasks as fast as the client allows. `paced` sends one task
every INTERVAL_MS milliseconds on a fixed schedule, stores each send time
(`time.time()` taken just before the enqueue call) in the `bench:sent` hash, and
never sends early. Tasks are numbered from --first. SYSTEM is taskvisor, celery, rq,
arq or dramatiq. Prints one JSON line with the count and the seconds it took. Run it
with the Python environment of SYSTEM, with BENCH_REDIS_URL set.
"""

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable

import redis
from bench_common import SENT_KEY, redis_url

# Tasks per pipeline when a client can batch a backlog.
CHUNK = 1000


def taskvisor_sender(client: redis.Redis) -> tuple[Callable[[int], None], Callable[[range], None]]:
    stream = os.environ["BENCH_TV_STREAM"]

    def fields(number: int) -> dict[str, str]:
        # A distinct instance per task, because taskvisor runs the tasks of one instance in order.
        return {"id": f"t-{number}", "type": "start", "instance": f"vm-{number}", "user": "bench"}

    def send_one(number: int) -> None:
        client.xadd(stream, fields(number))

    def send_many(numbers: range) -> None:
        pipe = client.pipeline(transaction=False)
        for index, number in enumerate(numbers, 1):
            pipe.xadd(stream, fields(number))
            if index % CHUNK == 0:
                pipe.execute()
        pipe.execute()

    return send_one, send_many


def celery_sender(client: redis.Redis) -> tuple[Callable[[int], None], Callable[[range], None]]:
    from celery_app import noop

    def send_many(numbers: range) -> None:
        for number in numbers:
            noop.delay(number)

    return noop.delay, send_many


def rq_sender(client: redis.Redis) -> tuple[Callable[[int], None], Callable[[range], None]]:
    from rq import Queue
    from rq_jobs import QUEUE, noop

    queue = Queue(QUEUE, connection=client)

    def send_one(number: int) -> None:
        # result_ttl=0: RQ deletes the job when it succeeds, the nearest to "no result backend".
        queue.enqueue(noop, number, result_ttl=0)

    def send_many(numbers: range) -> None:
        batch = list(numbers)
        for start in range(0, len(batch), CHUNK):
            jobs = [Queue.prepare_data(noop, args=(number,), result_ttl=0) for number in batch[start:start + CHUNK]]
            queue.enqueue_many(jobs)

    return send_one, send_many


def arq_sender(client: redis.Redis) -> tuple[Callable[[int], None], Callable[[range], None]]:
    from arq import create_pool
    from arq_worker import WorkerSettings

    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(create_pool(WorkerSettings.redis_settings))

    def send_one(number: int) -> None:
        loop.run_until_complete(pool.enqueue_job("noop", number))

    async def enqueue_all(numbers: range) -> None:
        batch = list(numbers)
        for start in range(0, len(batch), CHUNK):
            await asyncio.gather(*(pool.enqueue_job("noop", number) for number in batch[start:start + CHUNK]))

    def send_many(numbers: range) -> None:
        loop.run_until_complete(enqueue_all(numbers))

    return send_one, send_many


def dramatiq_sender(client: redis.Redis) -> tuple[Callable[[int], None], Callable[[range], None]]:
    from dramatiq_actors import noop

    def send_many(numbers: range) -> None:
        for number in numbers:
            noop.send(number)

    return noop.send, send_many


SENDERS = {
    "taskvisor": taskvisor_sender,
    "celery": celery_sender,
    "rq": rq_sender,
    "arq": arq_sender,
    "dramatiq": dramatiq_sender,
}


def send_paced(send_one: Callable[[int], None], numbers: range, interval: float) -> dict[str, str]:
    """Send one task per interval on a fixed schedule; return the send time of each task number."""
    sent: dict[str, str] = {}
    begin = time.monotonic()
    for index, number in enumerate(numbers):
        delay = begin + index * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[str(number)] = repr(time.time())
        send_one(number)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=sorted(SENDERS))
    parser.add_argument("mode", choices=["backlog", "paced"])
    parser.add_argument("count", type=int)
    parser.add_argument("interval_ms", type=float, nargs="?", default=10.0)
    parser.add_argument("--first", type=int, default=0, help="number of the first task")
    args = parser.parse_args()

    client = redis.Redis.from_url(redis_url())
    send_one, send_many = SENDERS[args.system](client)
    numbers = range(args.first, args.first + args.count)
    begin = time.perf_counter()
    if args.mode == "backlog":
        send_many(numbers)
    else:
        sent = send_paced(send_one, numbers, args.interval_ms / 1000)
        client.hset(SENT_KEY, mapping=sent)
    print(json.dumps({"system": args.system, "mode": args.mode, "sent": args.count,
                      "seconds": round(time.perf_counter() - begin, 3)}))


if __name__ == "__main__":
    main()
