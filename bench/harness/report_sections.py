"""The report sections of the cancel, resize and memory measurements, with their targets."""

from harness.cancel import CANCEL_AFTER_SECONDS, GONE_DEADLINE_SECONDS
from harness.memory import SETTLE_SECONDS

# The targets that docs/benchmarks.md checks taskvisor against.
CANCEL_P99_TARGET_MS = 50.0
NEW_WORKER_TARGET_MS = 1000.0
IDLE_WORKER_USS_TARGET_MIB = 10.0
FLEET_TARGET_WORKERS = 400
FLEET_TARGET_GIB = 6.0


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _load(values: list[float] | None) -> str:
    return "-" if not values else f"{values[0]:.2f}"


def cancel_lines(cancel: dict) -> list[str]:
    lines = [
        "## Cancel: stopping a running 30-second task",
        "",
        (f"Each repetition starts a task that sleeps 30 s and cancels it {CANCEL_AFTER_SECONDS:g} s after the"
         " sleeping process started. Milliseconds from `time.time()` just before the cancel call to the moment"
         " the harness saw the recorded process gone (exited; psutil, polled every 1 ms) and, for taskvisor,"
         " the status `cancelled` in the status hash. Stopped = the later of the two. Nearest-rank percentiles"
         " over the repetitions: with fewer than 100 repetitions the p99 is the maximum. Call = how long the cancel call"
         " itself took to return."),
        "",
        ("| System | Stopped p50 ms | p99 ms | max ms | Process gone p50 / p99 ms | Status cancelled p50 / p99 ms"
         " | Call p50 ms | Measured | Still running after"
         f" {GONE_DEADLINE_SECONDS:g} s | Load avg (1 min) before / after |"),
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]  # fmt: skip
    unsupported = []
    for name, row in cancel.items():
        if row.get("unsupported"):
            unsupported.append(f"- {name}: no measurement. {row['unsupported']}")
            continue
        lines.append(
            f"| {name} | {_number(row.get('stopped_p50_ms'))} | {_number(row.get('stopped_p99_ms'))}"
            f" | {_number(row.get('stopped_max_ms'))}"
            f" | {_number(row.get('gone_p50_ms'))} / {_number(row.get('gone_p99_ms'))}"
            f" | {_number(row.get('cancelled_p50_ms'))} / {_number(row.get('cancelled_p99_ms'))}"
            f" | {_number(row.get('call_p50_ms'))} | {row['measured']} of {len(row['runs'])}"
            f" | {row['survived']} | {_load(row.get('load_average_before'))} / {_load(row.get('load_average_after'))} |"
        )  # fmt: skip
    lines.append("")
    for name, row in cancel.items():
        if row.get("unsupported"):
            continue
        line = f"- {name}: {row['description']}."
        if row.get("survived"):
            line += (f" In {row['survived']} of {len(row['runs'])} repetitions the recorded process still ran"
                     f" {GONE_DEADLINE_SECONDS:g} s after the cancel call, and the harness killed it.")  # fmt: skip
            if row.get("parent_gone"):
                line += (f" Its parent process exited in {row['parent_gone']} of them, after p50"
                         f" {_number(row.get('parent_gone_p50_ms'))} / p99 {_number(row.get('parent_gone_p99_ms'))} ms.")
            else:
                line += " Its parent process kept running."
        lines.append(line)
    if unsupported:
        lines += ["", *unsupported]
    return [*lines, ""]


def resize_lines(resize: dict) -> list[str]:
    lines = [
        "## Resize: 1 worker to 4 while tasks run (taskvisor)",
        "",
        (f"{resize['description']}. All times are milliseconds from the settings change. Applied: the"
         " supervisor's log line `provider resized`. Workers started: the last new worker's `worker started`"
         " line (log times have 1 ms resolution). First task: each new worker's first task, as the driver"
         " recorded it. 4 running: 4 tasks running at once. Attempts other than 1 counts tasks that ran more"
         " than once, that is, runs that the resize interrupted."),
        "",
        ("| Run | Running before | Applied ms | Workers started ms | New workers' first task ms | 4 running ms"
         " | Tasks completed | Attempts other than 1 | Load avg (1 min) before |"),
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for index, run in enumerate(resize["runs"], 1):
        first_tasks = ", ".join(_number(value) for value in run.get("new_worker_first_task_ms", [])) or "-"
        completed = run["tasks"] - run["not_completed"] if "not_completed" in run else None
        lines.append(
            f"| {index} | {run.get('running_before', '-')} | {_number(run.get('applied_ms'))}"
            f" | {_number(run.get('workers_started_ms'))} | {first_tasks} | {_number(run.get('all_running_ms'))}"
            f" | {completed if completed is not None else '-'} of {run['tasks']}"
            f" | {run.get('attempts_not_1', '-')} | {_load(run.get('load_average_before'))} |"
        )  # fmt: skip
    lines += [
        "",
        (f"Median 4 running: {_number(resize['median_all_running_ms'])} ms; maximum"
         f" {_number(resize['max_all_running_ms'])} ms. Latest first task of a new worker:"
         f" {_number(resize['max_new_worker_first_task_ms'])} ms. Interrupted tasks: {resize['interrupted_tasks']}."),
        "",
    ]  # fmt: skip
    return lines


def memory_lines(memory: dict) -> list[str]:
    lines = [
        "## Memory: idle taskvisor processes",
        "",
        (f"psutil `memory_full_info()` of the supervisor and every process below it, {SETTLE_SECONDS:g} s after"
         " the last one started; the providers use the command driver and get no task. USS: memory only that"
         " process uses. PSS: shared pages split among the processes that map them, so a sum of PSS is what"
         " the processes take together. RSS counts shared pages in every process. MiB."),
        "",
    ]  # fmt: skip
    for name, setup in memory.items():
        workers = setup["providers"] * setup["workers_per_provider"]
        title = f"{setup['providers']} provider{'s' if setup['providers'] > 1 else ''} x {setup['workers_per_provider']} worker"
        title += "s" if setup["workers_per_provider"] > 1 else ""
        if name == "fleet" and workers < FLEET_TARGET_WORKERS:
            title += f" ({workers} workers, fewer than the {FLEET_TARGET_WORKERS} of the target)"
        lines += [
            f"### {title}",
            "",
            (f"Started in {_number(setup.get('start_seconds'))} s. Load average (1 min) before / during:"
             f" {_load(setup.get('load_average_before'))} / {_load(setup.get('load_average_during'))}."
             f" redis-server: {setup.get('redis_connected_clients', '-')} clients,"
             f" {_number(setup.get('redis_used_memory_mib'))} MiB used. Processes left after the stop:"
             f" {setup.get('left_after_stop', '-')}."),
            "",
            "| Processes | Count | USS total | PSS total | RSS total | USS per process, median / max | RSS per process, median |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]  # fmt: skip
        for role, row in setup["roles"].items():
            if role == "all":
                continue
            lines.append(
                f"| {role} | {row['processes']} | {_number(row['uss_mib'])} | {_number(row['pss_mib'])}"
                f" | {_number(row['rss_mib'])} | {_number(row['uss_median_mib'], 2)} / {_number(row['uss_max_mib'], 2)}"
                f" | {_number(row['rss_median_mib'], 2)} |"
            )  # fmt: skip
        total = setup["roles"].get("all", {})
        lines += [
            (f"| all | {total.get('processes', 0)} | {_number(total.get('uss_mib'))} | {_number(total.get('pss_mib'))}"
             f" | {_number(total.get('rss_mib'))} | | |"),
            "",
        ]  # fmt: skip
    return lines


def fleet_estimate_mib(fleet: dict) -> float | None:
    """Estimate the PSS total of FLEET_TARGET_WORKERS idle workers from a smaller fleet.

    The estimate adds one worker's median USS per missing worker to the measured PSS
    total, so it assumes that the shared pages do not grow with the worker count.
    """
    worker = fleet["roles"].get("worker")
    total = fleet["roles"].get("all")
    if not worker or not total:
        return None
    missing = FLEET_TARGET_WORKERS - worker["processes"]
    return total["pss_mib"] + max(0, missing) * worker["uss_median_mib"]


def target_lines(results: dict) -> list[str]:
    lines = []
    row = results.get("cancel", {}).get("taskvisor")
    if row and row.get("stopped_p99_ms") is not None:
        p99 = row["stopped_p99_ms"]
        verdict = "met" if p99 < CANCEL_P99_TARGET_MS and row["measured"] == len(row["runs"]) else "missed"
        lines.append(f"- Cancel p99 under {CANCEL_P99_TARGET_MS:g} ms: {verdict} ({p99:.1f} ms over {row['measured']} repetitions).")
    resize = results.get("resize")
    if resize and resize.get("max_new_worker_first_task_ms") is not None:
        latest = resize["max_new_worker_first_task_ms"]
        verdict = "met" if latest <= NEW_WORKER_TARGET_MS and resize["max_all_running_ms"] is not None else "missed"
        lines.append(f"- New workers take tasks within {NEW_WORKER_TARGET_MS / 1000:g} s of the change: {verdict}"
                     f" (latest first task {latest:.0f} ms; 4 running after at most {_number(resize['max_all_running_ms'], 0)} ms);"
                     f" tasks interrupted by the resize: {resize['interrupted_tasks']}.")  # fmt: skip
    memory = results.get("memory", {})
    worker = memory.get("single", {}).get("roles", {}).get("worker")
    if worker:
        uss = worker["uss_median_mib"]
        verdict = "met" if uss < IDLE_WORKER_USS_TARGET_MIB else "missed"
        lines.append(f"- One idle worker's USS under {IDLE_WORKER_USS_TARGET_MIB:g} MiB: {verdict} ({uss:.2f} MiB).")
    fleet = memory.get("fleet")
    if fleet and fleet["roles"].get("worker"):
        workers = fleet["roles"]["worker"]["processes"]
        pss_gib = fleet["roles"]["all"]["pss_mib"] / 1024
        if workers >= FLEET_TARGET_WORKERS:
            verdict = "met" if pss_gib <= FLEET_TARGET_GIB else "missed"
            lines.append(f"- {FLEET_TARGET_WORKERS} idle workers in {FLEET_TARGET_GIB:g} GiB: {verdict} (PSS total of all"
                         f" {fleet['roles']['all']['processes']} processes {pss_gib:.2f} GiB; USS total"
                         f" {fleet['roles']['all']['uss_mib'] / 1024:.2f} GiB; RSS total {fleet['roles']['all']['rss_mib'] / 1024:.2f} GiB).")  # fmt: skip
        else:
            estimate = fleet_estimate_mib(fleet) / 1024
            lines.append(f"- {FLEET_TARGET_WORKERS} idle workers in {FLEET_TARGET_GIB:g} GiB: not measured in this run,"
                         f" which had {workers} workers; estimate from them {estimate:.2f} GiB (PSS total plus one"
                         f" median worker USS per missing worker).")  # fmt: skip
    return lines


def failure_lines(results: dict) -> list[str]:
    failures = []
    for name, row in results.get("cancel", {}).items():
        if "error" in row:
            failures.append(f"- cancel {name}: {row['error']} (log: {row.get('log', '-')})")
        for run in row.get("runs", []):
            # A process that outlived the cancel is a result, shown in the cancel section.
            if "error" in run and not run.get("survived"):
                failures.append(f"- cancel {name} {run['task']}: {run['error']} (log: {row.get('log', '-')})")
    for index, run in enumerate(results.get("resize", {}).get("runs", []), 1):
        if "error" in run:
            failures.append(f"- resize run {index}: {run['error']} (log: {run.get('log', '-')})")
    for name, setup in results.get("memory", {}).items():
        if "error" in setup:
            failures.append(f"- memory {name}: {setup['error']} (log: {setup.get('log', '-')})")
    return failures

