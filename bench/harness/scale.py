"""The scale measurement: the concurrency-2 throughput run at growing backlogs (taskvisor, and Celery for reference).

Each backlog size runs once per system, as a throughput run that also samples Redis's
`used_memory`: before the enqueue, every 0.2 s until the backlog is done, and after
the workers stopped. If the cost per task stays flat, tasks/s and CPU ms per task
stay the same from the smallest backlog to the largest.
"""

import dataclasses

from harness.measure import measure_throughput
from harness.redis_server import PrivateRedis
from harness.systems import SYSTEMS, RunContext

# The systems that the scale measurement runs, when --only selects them.
SCALE_SYSTEMS = ("taskvisor", "celery")
CONCURRENCY = 2
# The deadline of a run grows with its backlog: at least this many seconds per task.
DEADLINE_SECONDS_PER_TASK = 0.01
MIB = 1024 * 1024


def add_per_task_figures(run: dict) -> None:
    """Add CPU ms per task and Redis memory in MiB (and bytes per task kept after the drain) to one run."""
    tasks = run["tasks"]
    run["worker_cpu_ms_per_task"] = round(run["worker_cpu_seconds"] * 1000 / tasks, 3)
    run["redis_cpu_ms_per_task"] = round(run["redis_cpu_seconds"] * 1000 / tasks, 3)
    for key in ("before", "peak", "after"):
        run[f"redis_used_memory_{key}_mib"] = round(run[f"redis_used_memory_{key}"] / MIB, 1)
    run["redis_bytes_per_task_after"] = round((run["redis_used_memory_after"] - run["redis_used_memory_before"]) / tasks, 1)


def measure_scale(server: PrivateRedis, context: RunContext, systems: list[str], counts: list[int], deadline_seconds: float,
                  progress) -> dict:  # fmt: skip
    """Run one throughput run per system and backlog size, smallest backlog first."""
    results: dict = {}
    scale_context = dataclasses.replace(context, concurrency=CONCURRENCY)
    for count in counts:
        for name in systems:
            if name not in SCALE_SYSTEMS:
                continue
            system = SYSTEMS[name]
            summary = results.setdefault(name, {"description": system.describe(CONCURRENCY), "runs": []})
            scale_context.label = f"scale-{count}"
            deadline = max(deadline_seconds, count * DEADLINE_SECONDS_PER_TASK)
            run = measure_throughput(server, system, scale_context, count, deadline, sample_memory=True)
            add_per_task_figures(run)
            summary["runs"].append(run)
            lag = run.get("mirror", {}).get("lag_max_seconds")
            progress(f"scale {name} {count:,} tasks: {run.get('tasks_per_second', run.get('error'))} tasks/s,"
                     f" CPU {run['worker_cpu_ms_per_task']} + {run['redis_cpu_ms_per_task']} ms/task, Redis used memory"
                     f" {run['redis_used_memory_before_mib']} / {run['redis_used_memory_peak_mib']} /"
                     f" {run['redis_used_memory_after_mib']} MiB" + (f", mirror lag max {lag} s" if lag is not None else "")
                     + f" load={run['load_average_before'][0]}")  # fmt: skip
    return results
