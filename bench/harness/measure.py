"""The two measurements: draining a backlog (throughput) and paced arrivals (latency).

During a throughput run of taskvisor, harness.mirror_lag samples how far the SQL
mirror trails the tasks. The scale measurement also samples Redis's memory.
"""

import json
import os
import resource
import statistics
import subprocess
import time

import redis

from harness.environment import load_average
from harness.mirror_lag import MirrorSampler
from harness.redis_server import MemorySampler, PrivateRedis
from harness.stats import nearest_rank
from harness.systems import APPS_DIR, RunContext, RunningSystem, System

DONE_KEY = "bench:done"
STARTED_KEY = "bench:started"
SENT_KEY = "bench:sent"
# Seconds between two reads of the done counter, which is the resolution of every measured time.
POLL_SECONDS = 0.005
# Seconds between two counts of completed rows in the SQLite mirror.
RECORD_POLL_SECONDS = 0.01
PRODUCER_TIMEOUT_SECONDS = 600
WARMUP_TASKS = 5
WARMUP_NUMBER = 1_000_000
# Seconds between two reads of Redis's used_memory when a throughput run samples it.
MEMORY_SAMPLE_SECONDS = 0.2


def run_producer(system: System, context: RunContext, arguments: list[str]) -> dict:
    """Run bench/apps/produce.py for `system` in its environment and return its JSON summary."""
    command = [system.python, os.path.join(APPS_DIR, "produce.py"), system.client, *arguments]
    completed = subprocess.run(command, cwd=APPS_DIR, env=context.environment(system.uses_taskvisor),
                               capture_output=True, text=True, timeout=PRODUCER_TIMEOUT_SECONDS, check=False)  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"producer for {system.name} failed with status {completed.returncode}:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_count(client: redis.Redis, running: RunningSystem, count: int, deadline: float,
                   readings: list[tuple[float, int]] | None = None) -> tuple[float | None, float | None]:  # fmt: skip
    """Poll the done counter until it reaches `count` or the deadline passes.

    Returns the perf_counter times at which the first task and the last one were seen done, each None if not seen.
    With `readings`, appends the time and value of every read to it.
    """
    first = None
    while time.perf_counter() < deadline:
        done = int(client.get(DONE_KEY) or 0)
        now = time.perf_counter()
        if readings is not None:
            readings.append((now, done))
        if first is None and done > 0:
            first = now
        if done >= count:
            return first, now
        if running.exited():
            break
        time.sleep(POLL_SECONDS)
    return first, None


def measure_throughput(server: PrivateRedis, system: System, context: RunContext, count: int, deadline_seconds: float,
                       sample_memory: bool = False) -> dict:  # fmt: skip
    """Drain a backlog of `count` no-op tasks, enqueued before the workers start, at `context.concurrency`.

    With `sample_memory`, also reads Redis's used_memory before the enqueue, every
    MEMORY_SAMPLE_SECONDS until the backlog is done, and after the workers stopped.
    """
    server.flush()
    context.mode = "throughput"
    system.prepare(context)
    memory = None
    if sample_memory:
        memory = MemorySampler(server.url, MEMORY_SAMPLE_SECONDS)
        memory_before = memory.used_memory()
        memory.start()
    produced = run_producer(system, context, ["backlog", str(count)])

    load_before = load_average()
    cpu_before = children_cpu_seconds()
    redis_cpu_before = server.cpu_seconds()
    begin = time.perf_counter()
    running = system.start(context)
    counter = system.mirror_counter(context)
    mirror = MirrorSampler(server.url, counter, count, begin) if counter is not None else None
    try:
        if mirror is not None:
            mirror.start()
        deadline = begin + deadline_seconds
        first, tasks_done = wait_for_count(server.client, running, count, deadline,
                                           mirror.done_readings if mirror is not None else None)  # fmt: skip
        end = None
        if tasks_done is not None:
            while time.perf_counter() < deadline:
                if system.all_recorded(context, count):
                    end = time.perf_counter()
                    break
                time.sleep(RECORD_POLL_SECONDS)
        done_count = int(server.client.get(DONE_KEY) or 0)
        redis_cpu = server.cpu_seconds() - redis_cpu_before
        crashed = running.exited() and end is None
        mirror_figures = mirror.stop() if mirror is not None else None
        memory_peak = memory.stop() if memory is not None else None
    finally:
        if mirror is not None and mirror.thread.is_alive():
            mirror.stopped.set()
        if memory is not None and memory.thread.is_alive():
            memory.stopped.set()
        running.stop()

    result = {
        "system": system.name,
        "tasks": count,
        "concurrency": context.concurrency,
        "enqueue_seconds": produced["seconds"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "done": done_count,
        "complete": end is not None,
        "log": running.log_path,
        "clean_stop": running.clean_stop,
        "worker_cpu_seconds": round(children_cpu_seconds() - cpu_before, 3),
        "redis_cpu_seconds": round(redis_cpu, 3),
    }
    if mirror_figures is not None:
        result["mirror"] = mirror_figures
    if memory is not None:
        result["redis_used_memory_before"] = memory_before
        result["redis_used_memory_peak"] = memory_peak
        result["redis_used_memory_after"] = server.client.info("memory")["used_memory"]
    if end is None:
        result["error"] = "a worker process exited early" if crashed else f"not done within {deadline_seconds:g} s"
        return result
    result.update({
        "seconds": round(end - begin, 4),
        "tasks_per_second": round(count / (end - begin), 1),
        "startup_seconds": round(first - begin, 4),
        # From the first task done to the last one recorded: the rate without start-up.
        "drain_tasks_per_second": round((count - 1) / (end - first), 1) if end > first else None,
        "record_lag_seconds": round(end - tasks_done, 4),
    })  # fmt: skip
    return result


def measure_latency(server: PrivateRedis, system: System, context: RunContext, count: int, interval_ms: float,
                    deadline_seconds: float) -> dict:  # fmt: skip
    """Send `count` tasks one every `interval_ms` to idle workers; time each from send to task start."""
    server.flush()
    context.mode = "latency"
    system.prepare(context)
    running = system.start(context)
    client = server.client
    result: dict = {"system": system.name, "tasks": count, "interval_ms": interval_ms, "log": running.log_path}
    try:
        # A few tasks first, so that every worker has started and connected.
        run_producer(system, context, ["paced", str(WARMUP_TASKS), "20", "--first", str(WARMUP_NUMBER)])
        _first, warm = wait_for_count(client, running, WARMUP_TASKS, time.perf_counter() + 60)
        if warm is None:
            result["error"] = "the warm-up tasks did not finish within 60 s"
            return result
        # Let the workers go back to waiting for work.
        time.sleep(1.0)
        client.delete(DONE_KEY, STARTED_KEY, SENT_KEY)

        result["load_average_before"] = load_average()
        run_producer(system, context, ["paced", str(count), f"{interval_ms:g}"])
        _first, last = wait_for_count(client, running, count, time.perf_counter() + deadline_seconds)
        result["load_average_after"] = load_average()
        sent = {key.decode(): float(value) for key, value in client.hgetall(SENT_KEY).items()}
        started = {key.decode(): float(value) for key, value in client.hgetall(STARTED_KEY).items()}
        result.update(system.latency_stages(client, sent, started))
    finally:
        running.stop()

    latencies = sorted((started[number] - sent[number]) * 1000 for number in sent if number in started)
    result["measured"] = len(latencies)
    result["clean_stop"] = running.clean_stop
    if last is None or not latencies:
        result["error"] = f"{len(latencies)} of {count} tasks started within {deadline_seconds:g} s"
        return result
    result.update({
        "p50_ms": round(nearest_rank(latencies, 0.50), 3),
        "p99_ms": round(nearest_rank(latencies, 0.99), 3),
        "max_ms": round(latencies[-1], 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    })  # fmt: skip
    return result
