"""Submit 30-second tasks and cancel them through one system's own API (cancel measurement).

    cancel_client.py CLIENT

CLIENT is taskvisor, celery, celery-pool, rq or arq. Run it with the Python
environment of that system, with BENCH_REDIS_URL set. It stays running and reads one
command a line from stdin, so that imports and connections are ready before anything
is timed. It replies to each command with one JSON line on stdout:

    submit NAME   enqueue the 30-second task with the task id NAME      {"submitted": NAME}
    cancel NAME   cancel that task                                       {"sent_at": ..., "returned_at": ...}

`sent_at` is `time.time()` taken just before the cancel call, and `returned_at` just
after it returned. The harness times the cancel from `sent_at`.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable

import redis
from bench_common import redis_url

# Seconds that arq's Job.abort() waits for the aborted job's result before it gives up.
ARQ_ABORT_WAIT_SECONDS = 2.0
# Seconds that the Celery worker gets to start and reply to a ping.
CELERY_PING_DEADLINE_SECONDS = 60.0


def taskvisor_client() -> tuple[Callable[[str], None], Callable[[str], None]]:
    """Push with XADD and cancel as docs/protocol.md describes: HSET the request, then PUBLISH the notice."""
    client = redis.Redis.from_url(redis_url())
    prefix = os.environ["BENCH_TV_PREFIX"]
    provider = os.environ["BENCH_TV_PROVIDER"]
    stream = f"{prefix}:{{{provider}}}:tasks"

    def submit(name: str) -> None:
        client.xadd(stream, {"id": name, "type": "start", "instance": f"vm-{name}", "user": "bench"})

    def cancel(name: str) -> None:
        client.hset(f"{prefix}:{{{provider}}}:task:{name}",
                    mapping={"cancel_request_user": "bench", "cancel_request_reason": "benchmark"})  # fmt: skip
        client.publish(f"{prefix}:cancel", f"{provider} {name}")

    return submit, cancel


def celery_client(task_name: str) -> tuple[Callable[[str], None], Callable[[str], None]]:
    from celery_app import app

    # A ping opens the broker connection that the control commands use, and shows that
    # the worker replies to remote control commands before the first task is sent. Control
    # commands go through Redis pub/sub, so a ping sent before the worker subscribed is
    # lost and is sent again.
    deadline = time.monotonic() + CELERY_PING_DEADLINE_SECONDS
    while not app.control.ping(timeout=1.0):
        if time.monotonic() >= deadline:
            raise SystemExit(f"timed out: the Celery worker did not reply to a ping within {CELERY_PING_DEADLINE_SECONDS:g} s;"
                             " see its log in bench/scratch")
    task = app.tasks[task_name]

    def submit(name: str) -> None:
        task.apply_async(args=[name], task_id=name)

    def cancel(name: str) -> None:
        app.control.revoke(name, terminate=True, signal="SIGTERM")

    return submit, cancel


def rq_client() -> tuple[Callable[[str], None], Callable[[str], None]]:
    from rq import Queue
    from rq.command import send_stop_job_command
    from rq_jobs import QUEUE, sleep_subprocess

    client = redis.Redis.from_url(redis_url())
    queue = Queue(QUEUE, connection=client)

    def submit(name: str) -> None:
        queue.enqueue(sleep_subprocess, name, job_id=name, result_ttl=0)

    def cancel(name: str) -> None:
        send_stop_job_command(client, name)

    return submit, cancel


def arq_client() -> tuple[Callable[[str], None], Callable[[str], None]]:
    from arq import create_pool
    from arq.jobs import Job
    from arq_worker import CancelWorkerSettings

    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(create_pool(CancelWorkerSettings.redis_settings))

    def submit(name: str) -> None:
        loop.run_until_complete(pool.enqueue_job("sleep_subprocess", name, _job_id=name))

    async def abort(name: str) -> None:
        # abort() stores the request and then waits for the job's result, which this
        # benchmark does not keep, so the wait ends with a timeout or ResultNotFound.
        try:
            await Job(name, pool).abort(timeout=ARQ_ABORT_WAIT_SECONDS, poll_delay=0.05)
        except TimeoutError:
            pass

    def cancel(name: str) -> None:
        loop.run_until_complete(abort(name))

    return submit, cancel


CLIENTS: dict[str, Callable[[], tuple[Callable[[str], None], Callable[[str], None]]]] = {
    "taskvisor": taskvisor_client,
    "celery": lambda: celery_client("bench.sleep_subprocess"),
    "celery-pool": lambda: celery_client("bench.sleep_in_pool"),
    "rq": rq_client,
    "arq": arq_client,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("client", choices=sorted(CLIENTS))
    args = parser.parse_args()
    submit, cancel = CLIENTS[args.client]()
    print(json.dumps({"ready": args.client}), flush=True)

    for line in sys.stdin:
        command, _, name = line.strip().partition(" ")
        if command == "submit":
            submit(name)
            print(json.dumps({"submitted": name}), flush=True)
        elif command == "cancel":
            sent_at = time.time()
            cancel(name)
            print(json.dumps({"sent_at": sent_at, "returned_at": time.time()}), flush=True)
        else:
            raise SystemExit(f"invalid command {line.strip()!r}: expected 'submit NAME' or 'cancel NAME'")


if __name__ == "__main__":
    main()
