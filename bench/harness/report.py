"""Medians, taskvisor/peer ratios and the Markdown report of one benchmark run."""

import statistics

from harness import report_mirror_scale, report_sections

# The targets that docs/benchmarks.md checks taskvisor against: at concurrency 2, at
# least twice Celery's tasks/s; at concurrency 16, at least Dramatiq's.
THROUGHPUT_TARGET_VERSUS_CELERY = 2.0
THROUGHPUT_TARGET_CONCURRENCY = 2
HIGH_CONCURRENCY_TARGET_VERSUS_DRAMATIQ = 1.0
HIGH_CONCURRENCY = 16


def median_of(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None and "error" not in run]
    return round(statistics.median(values), 3) if values else None


def summarize(results: dict) -> None:
    """Add medians and ratios to `results` in place."""
    for table in results.get("throughput", {}).values():
        summarize_throughput(table)
    report_mirror_scale.summarize_mirror(results)

    latency = results.get("latency", {})
    for summary in latency.values():
        for key in ("p50_ms", "p99_ms", "max_ms", "mean_ms"):
            summary[f"median_{key}"] = median_of(summary["runs"], key)
    tv = latency.get("taskvisor", {})
    for summary in latency.values():
        for key in ("p50_ms", "p99_ms"):
            mine, theirs = tv.get(f"median_{key}"), summary[f"median_{key}"]
            summary[f"taskvisor_{key}_ratio"] = round(mine / theirs, 3) if mine and theirs else None


def summarize_throughput(throughput: dict) -> None:
    """Add medians and taskvisor ratios to the rows of one concurrency's throughput table."""
    for summary in throughput.values():
        summary["median_tasks_per_second"] = median_of(summary["runs"], "tasks_per_second")
        summary["median_drain_tasks_per_second"] = median_of(summary["runs"], "drain_tasks_per_second")
        summary["median_startup_seconds"] = median_of(summary["runs"], "startup_seconds")
        cpu = median_of(summary["runs"], "worker_cpu_seconds")
        redis_cpu = median_of(summary["runs"], "redis_cpu_seconds")
        tasks = summary["tasks"]
        summary["worker_cpu_ms_per_task"] = round(cpu * 1000 / tasks, 3) if cpu is not None else None
        summary["redis_cpu_ms_per_task"] = round(redis_cpu * 1000 / tasks, 3) if redis_cpu is not None else None
    reference = throughput.get("taskvisor", {})
    for summary in throughput.values():
        for key, ratio_key in (("median_tasks_per_second", "taskvisor_ratio"),
                               ("median_drain_tasks_per_second", "taskvisor_drain_ratio")):
            mine, theirs = reference.get(key), summary[key]
            summary[ratio_key] = round(mine / theirs, 3) if mine and theirs else None


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _runs_text(runs: list[dict], key: str, digits: int) -> str:
    return ", ".join(_number(run.get(key), digits) if "error" not in run else "failed" for run in runs)


def _loads_text(runs: list[dict]) -> str:
    return ", ".join(_number(run.get("load_average_before", [None])[0], 2) for run in runs)


# The start of each target's line in the Targets section, and the target's name for a run that did not measure it.
TARGET_NAMES = (
    ("- Throughput at least", f"throughput at least {THROUGHPUT_TARGET_VERSUS_CELERY:g}x Celery"),
    (f"- Throughput at concurrency {HIGH_CONCURRENCY}", f"throughput at concurrency {HIGH_CONCURRENCY} (full mode)"),
    ("- Latency p50", "latency p50"),
    ("- Latency p99", "latency p99"),
    ("- Mirror lag", "mirror lag"),
    ("- Cancel p99", "cancel p99 (--measure cancel)"),
    ("- New workers take tasks", "resize (--measure resize)"),
    ("- One idle worker's USS", "idle worker's USS (--measure memory)"),
    (f"- {report_sections.FLEET_TARGET_WORKERS} idle workers", f"{report_sections.FLEET_TARGET_WORKERS} idle workers"
     " (--measure memory, full mode)"),
)


def targets_text(results: dict) -> list[str]:
    lines = []
    throughput = results.get("throughput", {})
    celery = throughput.get(str(THROUGHPUT_TARGET_CONCURRENCY), {}).get("celery")
    if celery and celery.get("taskvisor_ratio") is not None:
        ratio = celery["taskvisor_ratio"]
        verdict = "met" if ratio >= THROUGHPUT_TARGET_VERSUS_CELERY else "missed"
        lines.append(f"- Throughput at least {THROUGHPUT_TARGET_VERSUS_CELERY:g}x Celery: {verdict}"
                     f" (taskvisor/Celery = {ratio:.2f}).")  # fmt: skip
    dramatiq = throughput.get(str(HIGH_CONCURRENCY), {}).get("dramatiq")
    if dramatiq and dramatiq.get("taskvisor_ratio") is not None:
        ratio = dramatiq["taskvisor_ratio"]
        verdict = "met" if ratio >= HIGH_CONCURRENCY_TARGET_VERSUS_DRAMATIQ else "missed"
        lines.append(f"- Throughput at concurrency {HIGH_CONCURRENCY} at least Dramatiq's: {verdict}"
                     f" (taskvisor/Dramatiq = {ratio:.2f}).")  # fmt: skip
    celery = results.get("latency", {}).get("celery")
    if celery:
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            ratio = celery.get(f"taskvisor_{key}_ratio")
            if ratio is not None:
                verdict = "met" if ratio <= 1.0 else "missed"
                lines.append(f"- Latency {label} no worse than Celery: {verdict} (taskvisor/Celery = {ratio:.2f}).")
    return lines


def markdown(results: dict) -> str:
    """Render the whole report: header, throughput, latency, targets, failed runs and notes."""
    lines = header_lines(results)
    for concurrency, table in results.get("throughput", {}).items():
        if table:
            lines += throughput_lines(table, int(concurrency))
    lines += report_mirror_scale.mirror_lines(results)
    if results.get("latency"):
        lines += latency_lines(results["latency"], results["settings"]["interval_ms"])
    if results.get("cancel"):
        lines += report_sections.cancel_lines(results["cancel"])
    if results.get("resize"):
        lines += report_sections.resize_lines(results["resize"])
    if results.get("memory"):
        lines += report_sections.memory_lines(results["memory"])
    if results.get("scale"):
        lines += report_mirror_scale.scale_lines(results["scale"])

    targets = targets_text(results) + report_mirror_scale.target_lines(results) + report_sections.target_lines(results)
    if targets:
        unmeasured = [name for prefix, name in TARGET_NAMES if not any(line.startswith(prefix) for line in targets)]
        if unmeasured:
            targets.append(f"- Not measured in this run: {'; '.join(unmeasured)}.")
        lines += ["## Targets", "", *targets, ""]

    failures = [
        f"- throughput c{concurrency} {name} run {index + 1}: {run['error']} (log: {run.get('log', '-')})"
        for concurrency, table in results.get("throughput", {}).items()
        for name, summary in table.items()
        for index, run in enumerate(summary["runs"])
        if "error" in run
    ]  # fmt: skip
    failures += [
        f"- latency {name} run {index + 1}: {run['error']} (log: {run.get('log', '-')})"
        for name, summary in results.get("latency", {}).items()
        for index, run in enumerate(summary["runs"])
        if "error" in run
    ]  # fmt: skip
    failures += report_mirror_scale.failure_lines(results)
    failures += report_sections.failure_lines(results)
    if failures:
        lines += ["## Failed runs", "", *failures, ""]

    notes = results.get("notes", [])
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines).rstrip() + "\n"


def header_lines(results: dict) -> list[str]:
    machine = results["machine"]
    versions = results["versions"]
    return [
        f"# Benchmark results ({results['mode']} mode)",
        "",
        f"- Date: {results['date']}",
        f"- Command: `{results['command']}`",
        (f"- Machine: {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['cpu_model']},"
         f" Linux {machine['kernel']}, Python {machine['python']}"),
        (f"- Load average (1, 5, 15 min) at start: {_load_averages_text(results['load_average_start'])},"
         f" at end: {_load_averages_text(results['load_average_end'])}"),
        (f"- Highest 1-minute load average seen during the run: {results['load_average_highest']:.2f}"
         f" ({results['load_average_samples']} sample{'' if results['load_average_samples'] == 1 else 's'}, one every 5 s)"),
        (f"- taskvisor commit: {versions['taskvisor_commit']}; redis-server {versions['redis_server']}"
         + (f"; mariadbd {versions['mariadb_server']}" if versions.get("mariadb_server") else "")),
        f"- taskvisor environment: {_versions_text(versions['taskvisor_environment'])}",
        f"- bench/.venv-peers: {_versions_text(versions['peers_environment'])}",
        f"- bench/.venv-arq: {_versions_text(versions['arq_environment'])}",
        f"- Wall time of the whole command: {results['total_seconds']:.0f} s",
        "",
    ]  # fmt: skip


def _load_averages_text(loads: list[float]) -> str:
    return " / ".join(f"{load:.2f}" for load in loads)


def throughput_lines(throughput: dict, concurrency: int) -> list[str]:
    lines = [
        f"## Throughput: draining a backlog at total concurrency {concurrency}",
        "",
        ("tasks/s = tasks ÷ seconds from starting the workers to the last task recorded (median of the runs)."
         " Drain tasks/s leaves out the start-up: tasks after the first ÷ seconds from the first task done to"
         " the last recorded. taskvisor ÷ system is the taskvisor row's (SQLite mirror) ÷ the row's, so > 1"
         " means taskvisor is faster. CPU columns: ms of CPU per task, of the workers (all their processes,"
         " start-up included) and of redis-server, medians."),
        "",
        ("| System | Tasks | Runs (tasks/s) | Median tasks/s | taskvisor ÷ system | Drain tasks/s"
         " | taskvisor ÷ system (drain) | Start-up s | Worker CPU ms/task | Redis CPU ms/task"
         " | Load avg (1 min) before each run |"),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for name, summary in throughput.items():
        lines.append(
            f"| {name} | {summary['tasks']:,} | {_runs_text(summary['runs'], 'tasks_per_second', 0)}"
            f" | {_number(summary['median_tasks_per_second'], 0)} | {_number(summary['taskvisor_ratio'], 2)}"
            f" | {_number(summary['median_drain_tasks_per_second'], 0)}"
            f" | {_number(summary['taskvisor_drain_ratio'], 2)}"
            f" | {_number(summary['median_startup_seconds'], 2)}"
            f" | {_number(summary['worker_cpu_ms_per_task'], 2)} | {_number(summary['redis_cpu_ms_per_task'], 2)}"
            f" | {_loads_text(summary['runs'])} |"
        )  # fmt: skip
    lines.append("")
    lines += [f"- {name}: {summary['description']}." for name, summary in throughput.items()]
    return [*lines, ""]


def latency_lines(latency: dict, interval_ms: float) -> list[str]:
    lines = [
        f"## Latency: one task every {interval_ms:g} ms at idle workers",
        "",
        ("Milliseconds from the producer's send call to the start of the task's code; medians of the"
         " runs' percentiles. taskvisor ÷ system < 1 means taskvisor is faster."),
        "",
        ("| System | Tasks | p50 ms | p99 ms | max ms | Runs (p50 / p99) | taskvisor ÷ system p50 | taskvisor ÷ system p99"
         " | Load avg (1 min) before each run |"),
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]  # fmt: skip
    for name, summary in latency.items():
        per_run = ", ".join(
            f"{_number(run.get('p50_ms'), 2)} / {_number(run.get('p99_ms'), 2)}" if "error" not in run else "failed"
            for run in summary["runs"]
        )
        lines.append(
            f"| {name} | {summary['tasks']:,} | {_number(summary['median_p50_ms'], 2)}"
            f" | {_number(summary['median_p99_ms'], 2)} | {_number(summary['median_max_ms'], 2)} | {per_run}"
            f" | {_number(summary['taskvisor_p50_ms_ratio'], 2)} | {_number(summary['taskvisor_p99_ms_ratio'], 2)}"
            f" | {_loads_text(summary['runs'])} |"
        )  # fmt: skip
    lines.append("")

    stages = latency.get("taskvisor", {}).get("runs", [])
    if median_of(stages, "send_to_running_p50_ms") is None:
        return lines
    return lines + [
        ("taskvisor's latency split at `started_at`, the Redis time at which start.lua made the task"
         " running. The values are medians of the runs. Each percentile is taken on its own, so the parts"
         " need not add up to the totals above."),
        "",
        "| Stage | p50 ms | p99 ms |",
        "|---|---:|---:|",
        (f"| send to running | {_number(median_of(stages, 'send_to_running_p50_ms'), 2)}"
         f" | {_number(median_of(stages, 'send_to_running_p99_ms'), 2)} |"),
        (f"| running to the driver's code | {_number(median_of(stages, 'running_to_driver_p50_ms'), 2)}"
         f" | {_number(median_of(stages, 'running_to_driver_p99_ms'), 2)} |"),
        "",
    ]  # fmt: skip


def _versions_text(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())
