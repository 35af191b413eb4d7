"""The report sections of the SQL mirror's lag and of the scale measurement, with the mirror's target."""

import statistics

from harness.mirror_lag import QUERY_DUTY_FACTOR, QUERY_WINDOW, SAMPLE_SECONDS, STATE_CHANGES_PER_TASK
from harness.scale import DEADLINE_SECONDS_PER_TASK

# The target that docs/benchmarks.md checks taskvisor against: during the concurrency-2
# throughput run, the SQL table trails the done counter by less than this, on both databases.
MIRROR_LAG_TARGET_SECONDS = 1.0
MIRROR_TARGET_CONCURRENCY = "2"
MIRROR_ROWS = {"taskvisor": "SQLite", "taskvisor-mariadb": "MariaDB"}


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarize_mirror(results: dict) -> None:
    """Add a `mirror` summary to every throughput row whose runs sampled the SQL mirror.

    The lag maximum is the largest of all runs, failed runs included. The lag p99, the
    state changes per second and the count query's p50 are medians of the runs.
    """
    for table in results.get("throughput", {}).values():
        for summary in table.values():
            figures = [run["mirror"] for run in summary["runs"] if "mirror" in run]
            if not figures:
                continue
            lag_max = [figure["lag_max_seconds"] for figure in figures if "lag_max_seconds" in figure]
            query_max = [figure["count_query_max_ms"] for figure in figures if "count_query_max_ms" in figure]
            summary["mirror"] = {
                "lag_max_seconds": max(lag_max) if lag_max else None,
                "lag_p99_seconds": _median([figure["lag_p99_seconds"] for figure in figures if "lag_p99_seconds" in figure]),
                "state_changes_per_second": _median([figure["state_changes_per_second"] for figure in figures
                                                     if "state_changes_per_second" in figure]),  # fmt: skip
                "samples": sum(figure["samples"] for figure in figures),
                "count_query_p50_ms": _median([figure["count_query_p50_ms"] for figure in figures if "count_query_p50_ms" in figure]),
                "count_query_max_ms": max(query_max) if query_max else None,
            }  # fmt: skip


def mirror_lines(results: dict) -> list[str]:
    rows = [
        (concurrency, name, summary)
        for concurrency, table in results.get("throughput", {}).items()
        for name, summary in table.items()
        if "mirror" in summary
    ]  # fmt: skip
    if not rows:
        return []
    lines = [
        "## SQL mirror during the throughput runs",
        "",
        (f"Every {SAMPLE_SECONDS * 1000:g} ms a harness thread counted the `completed` rows of the SQL table"
         " (one `SELECT COUNT(*)`), then read the done counter `bench:done`. The harness's 5 ms reads of the"
         " counter were added to its series. Lag of a sample: seconds since the counter first reached the"
         " table's count (1 while the table had no completed row), or 0 when the counter was no higher than the"
         " table's count. Lag max is the largest of all runs, and lag p99 is the median of the runs'"
         " nearest-rank p99. Runs: each"
         " run's largest lag, at seconds from the workers' start. State"
         f" changes/s: completed rows added from the first sample with one to the first sample with all of"
         f" them, ÷ the seconds between the two, x {STATE_CHANGES_PER_TASK} (pending, running, completed),"
         " median of the runs. Count query: how long the harness's count query took, p50 (median of the runs)"
         f" and max. Two samples start at least {QUERY_DUTY_FACTOR} times the median of the last"
         f" {QUERY_WINDOW} query times apart, so a slow count is sampled less often."),
        "",
        ("| Row | Concurrency | Tasks | Lag max s | Lag p99 s | Runs (lag max s at s) | State changes/s"
         " | Samples | Count query p50 / max ms |"),
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]  # fmt: skip
    for concurrency, name, summary in rows:
        mirror = summary["mirror"]
        per_run = ", ".join(
            f"{_number(run.get('mirror', {}).get('lag_max_seconds'), 3)} at {_number(run.get('mirror', {}).get('lag_max_at_seconds'), 2)}"
            for run in summary["runs"]
        )
        lines.append(
            f"| {name} | {concurrency} | {summary['tasks']:,} | {_number(mirror['lag_max_seconds'], 3)}"
            f" | {_number(mirror['lag_p99_seconds'], 3)} | {per_run} | {_number(mirror['state_changes_per_second'], 0)}"
            f" | {mirror['samples']} | {_number(mirror['count_query_p50_ms'], 2)} / {_number(mirror['count_query_max_ms'], 2)} |"
        )  # fmt: skip
    return [*lines, ""]


def scale_lines(scale: dict) -> list[str]:
    lines = [
        "## Scale: the concurrency-2 throughput run at growing backlogs",
        "",
        ("One run per system and backlog size. tasks/s, drain tasks/s and the CPU columns are measured as in"
         " the throughput table. Redis used memory (INFO memory, `used_memory`, MiB): before the enqueue (after"
         " FLUSHALL), the highest of the samples taken every 0.2 s from the enqueue until the backlog was done,"
         " and after the workers stopped. Kept per task: (after - before) ÷ tasks, in bytes. A run's deadline"
         f" is the mode's deadline or {DEADLINE_SECONDS_PER_TASK * 1000:g} ms per task, whichever is longer."),
        "",
        ("| System | Tasks | tasks/s | Drain tasks/s | Worker CPU ms/task | Redis CPU ms/task"
         " | Redis MiB before / peak / after | Kept per task, bytes | Enqueue s | Mirror lag max s"
         " | Load avg (1 min) before |"),
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, summary in scale.items():
        for run in summary["runs"]:
            rate = _number(run.get("tasks_per_second"), 0) if "error" not in run else "failed"
            lines.append(
                f"| {name} | {run['tasks']:,} | {rate} | {_number(run.get('drain_tasks_per_second'), 0)}"
                f" | {_number(run['worker_cpu_ms_per_task'], 2)} | {_number(run['redis_cpu_ms_per_task'], 2)}"
                f" | {_number(run['redis_used_memory_before_mib'])} / {_number(run['redis_used_memory_peak_mib'])}"
                f" / {_number(run['redis_used_memory_after_mib'])} | {_number(run['redis_bytes_per_task_after'], 0)}"
                f" | {_number(run['enqueue_seconds'], 1)} | {_number(run.get('mirror', {}).get('lag_max_seconds'), 3)}"
                f" | {_number(run['load_average_before'][0], 2)} |"
            )  # fmt: skip
    lines.append("")
    lines += [f"- {name}: {summary['description']}." for name, summary in scale.items()]
    return [*lines, ""]


def target_lines(results: dict) -> list[str]:
    table = results.get("throughput", {}).get(MIRROR_TARGET_CONCURRENCY, {})
    measured = {
        database: table[name]["mirror"]["lag_max_seconds"]
        for name, database in MIRROR_ROWS.items()
        if table.get(name, {}).get("mirror", {}).get("lag_max_seconds") is not None
    }  # fmt: skip
    if not measured:
        return []
    figures = "; ".join(f"{database} max {lag:.3f} s" for database, lag in measured.items())
    missing = [database for database in MIRROR_ROWS.values() if database not in measured]
    if any(lag >= MIRROR_LAG_TARGET_SECONDS for lag in measured.values()):
        verdict = "missed"
    elif missing:
        verdict = f"not measured on {' and '.join(missing)}; under the limit on the rest"
    else:
        verdict = "met"
    return [f"- Mirror lag under {MIRROR_LAG_TARGET_SECONDS:g} s during the concurrency-{MIRROR_TARGET_CONCURRENCY}"
            f" throughput run, on SQLite and on MariaDB: {verdict} ({figures})."]  # fmt: skip


def failure_lines(results: dict) -> list[str]:
    return [
        f"- scale {name} {run['tasks']:,} tasks: {run['error']} (log: {run.get('log', '-')})"
        for name, summary in results.get("scale", {}).items()
        for run in summary["runs"]
        if "error" in run
    ]  # fmt: skip
