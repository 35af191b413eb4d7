"""The resize measurement: raising a running provider from 1 worker to 4 (taskvisor only).

Each repetition starts taskvisor with one provider at `maxConcurrentTasks: 1` and a
backlog of slow tasks (bench/apps/sleep_driver.py, 0.5 s each). Two seconds after
the first task started (plus a fraction of a second that differs per repetition),
the harness writes `maxConcurrentTasks` 4 into the
provider's settings hash and publishes on the config channel, as docs/protocol.md
("Provider settings") describes. It then polls the number of tasks whose driver code
runs until it reaches 4. When the backlog is done, it checks that every task
completed with `attempts` 1, that is, that the resize interrupted no running task.
"""

import os
import re
import statistics
import time

from harness.environment import REPO_DIR, load_average
from harness.redis_server import PrivateRedis
from harness.systems import SYSTEMS, TASKVISOR_PREFIX, RunContext

PROVIDER = "slow"
WORKERS_BEFORE = 1
WORKERS_AFTER = 4
# Seconds from the first task's start to the settings change in the first repetition.
# Each later repetition adds a fraction of SUPERVISOR_TICK_SECONDS, so that the changes
# fall at different points of the supervisor's loop, which runs once a second
# (TICK_SECONDS in supervisor/main.py).
RESIZE_AFTER_SECONDS = 2.0
SUPERVISOR_TICK_SECONDS = 1.0
# Seconds between two reads of the running-task counter.
POLL_SECONDS = 0.002
# Seconds that the resized provider gets to run WORKERS_AFTER tasks at once.
RESIZE_DEADLINE_SECONDS = 15.0
START_DEADLINE_SECONDS = 60.0
# Keys written by bench/apps/sleep_driver.py.
RUNNING_KEY = "bench:running"
FIRST_START_KEY = "bench:first-start"


# Log lines of the supervisor and its workers start with the local time, to the millisecond.
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_time(line: str) -> float | None:
    """Return the time.time() value of a taskvisor log line's timestamp, or None for a line without one."""
    match = LOG_TIME.match(line)
    if match is None:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def stages_from_log(log_path: str, changed_at: float) -> dict:
    """Split the resize with the supervisor's log: when it applied the change, and when the new workers started.

    The log times have a resolution of 1 ms.
    """
    applied_at = None
    started = []
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            at = log_time(line)
            if at is None or at < changed_at - 0.001:
                continue
            if applied_at is None and f"provider resized provider={PROVIDER} " in line:
                applied_at = at
            elif applied_at is not None and "worker started" in line:
                started.append(at)
    stages: dict = {}
    if applied_at is not None:
        stages["applied_ms"] = round((applied_at - changed_at) * 1000, 1)
    if started:
        stages["workers_started_ms"] = round((max(started) - changed_at) * 1000, 1)
    return stages


def task_key(name: str) -> str:
    return f"{TASKVISOR_PREFIX}:{{{PROVIDER}}}:task:{name}"


def providers_yaml(context: RunContext, task_seconds: float) -> str:
    return f"""\
  {PROVIDER}:
    allowConcurrentTasks: true
    maxConcurrentTasks: {WORKERS_BEFORE}
    driver:
      type: "sleep_driver:SleepDriver"
      options: {{redisUrl: "{context.redis_url}", seconds: {task_seconds}}}
"""


def wait_for_running(client, at_least: int, deadline: float) -> tuple[float | None, int]:
    """Poll the running-task counter until it reaches `at_least`.

    Returns the time.time() at which it did (None at the deadline) and the highest value seen.
    """
    highest = 0
    while time.time() < deadline:
        running = int(client.get(RUNNING_KEY) or 0)
        highest = max(highest, running)
        if running >= at_least:
            return time.time(), highest
        time.sleep(POLL_SECONDS)
    return None, highest


def wait_for_final(client, names: list[str], deadline: float) -> list[tuple[str, str]]:
    """Wait until every task has a final status, and return each task's (status, attempts)."""
    while True:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(task_key(name), "status", "attempts")
        states = [((status or b"").decode(), (attempts or b"").decode()) for status, attempts in pipe.execute()]
        if all(status in ("completed", "failed", "timeout", "cancelled") for status, _ in states) or time.time() >= deadline:
            return states
        time.sleep(0.05)


def resize_once(server: PrivateRedis, context: RunContext, index: int, tasks: int, task_seconds: float,
                resize_after: float) -> dict:  # fmt: skip
    system = SYSTEMS["taskvisor"]
    client = server.client
    server.flush()
    context.mode = "resize"
    context.label = f"resize-{index}"
    system.write_config(context, providers_yaml(context, task_seconds), extra="health: {port: 0}\n")
    names = [f"r-{number}" for number in range(tasks)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xadd(f"{TASKVISOR_PREFIX}:{{{PROVIDER}}}:tasks", {"id": name, "type": "start", "instance": f"vm-{name}", "user": "bench"})
    pipe.execute()

    result: dict = {"tasks": tasks, "resize_after_seconds": round(resize_after, 3), "load_average_before": load_average()}
    running = system.start(context)
    result["log"] = running.log_path
    try:
        first_at, _ = wait_for_running(client, 1, time.time() + START_DEADLINE_SECONDS)
        if first_at is None:
            result["error"] = f"no task started within {START_DEADLINE_SECONDS:g} s"
            return result
        time.sleep(max(0.0, first_at + resize_after - time.time()))
        result["running_before"] = int(client.get(RUNNING_KEY) or 0)

        changed_at = time.time()
        client.hset(f"{TASKVISOR_PREFIX}:{{{PROVIDER}}}:settings", "maxConcurrentTasks", str(WORKERS_AFTER))
        client.publish(f"{TASKVISOR_PREFIX}:config", PROVIDER)
        all_running_at, highest = wait_for_running(client, WORKERS_AFTER, changed_at + RESIZE_DEADLINE_SECONDS)
        result["highest_running"] = highest
        if all_running_at is None:
            result["error"] = f"{highest} tasks ran at once at most, not {WORKERS_AFTER}, {RESIZE_DEADLINE_SECONDS:g} s after the change"
        else:
            result["all_running_ms"] = round((all_running_at - changed_at) * 1000, 1)

        states = wait_for_final(client, names, time.time() + tasks * task_seconds + 60)
        first_starts = {pid.decode(): float(value) for pid, value in client.hgetall(FIRST_START_KEY).items()}
    finally:
        running.stop()
    result["clean_stop"] = running.clean_stop
    result["load_average_after"] = load_average()
    result.update(stages_from_log(os.path.join(REPO_DIR, running.log_path), changed_at))

    # Workers whose first task started after the change are the new ones.
    new_workers = sorted((started - changed_at) * 1000 for started in first_starts.values() if started > changed_at)
    result["new_workers"] = len(new_workers)
    result["new_worker_first_task_ms"] = [round(value, 1) for value in new_workers]
    result["not_completed"] = sum(1 for status, _ in states if status != "completed")
    result["attempts_not_1"] = sum(1 for _, attempts in states if attempts != "1")
    if "error" not in result and (result["not_completed"] or result["attempts_not_1"]):
        result["error"] = (f"{result['not_completed']} tasks not completed and {result['attempts_not_1']} tasks"
                           " with attempts other than 1")  # fmt: skip
    return result


def measure_resize(server: PrivateRedis, context: RunContext, repetitions: int, tasks: int, task_seconds: float,
                   progress) -> dict:  # fmt: skip
    runs = []
    for index in range(1, repetitions + 1):
        resize_after = RESIZE_AFTER_SECONDS + SUPERVISOR_TICK_SECONDS * (index - 1) / repetitions
        run = resize_once(server, context, index, tasks, task_seconds, resize_after)
        runs.append(run)
        progress(f"resize run {index}: 4 running after {run.get('all_running_ms')} ms, new workers' first task"
                 f" after {run.get('new_worker_first_task_ms')} ms, attempts other than 1: {run.get('attempts_not_1')}"
                 f" {run.get('error', '')} load={run['load_average_before'][0]}")  # fmt: skip
    measured = [run["all_running_ms"] for run in runs if "all_running_ms" in run]
    last_new_worker = [max(run["new_worker_first_task_ms"]) for run in runs if run.get("new_worker_first_task_ms")]
    return {
        "description": (f"1 provider, maxConcurrentTasks {WORKERS_BEFORE} -> {WORKERS_AFTER} through the settings hash and"
                        f" a PUBLISH on {TASKVISOR_PREFIX}:config, {RESIZE_AFTER_SECONDS:g} s after the first of"
                        f" {tasks} tasks of {task_seconds:g} s started (Python driver bench/apps/sleep_driver.py),"
                        f" plus (run - 1) / {repetitions} s, so the changes fall at different points of the"
                        " supervisor's loop, which runs every 0.25 s"),
        "tasks": tasks,
        "task_seconds": task_seconds,
        "runs": runs,
        "median_all_running_ms": round(statistics.median(measured), 1) if measured else None,
        "max_all_running_ms": max(measured) if measured else None,
        "max_new_worker_first_task_ms": max(last_new_worker) if last_new_worker else None,
        "interrupted_tasks": sum(run.get("attempts_not_1", 0) for run in runs),
        "not_completed_tasks": sum(run.get("not_completed", 0) for run in runs),
    }  # fmt: skip
