"""The memory measurement: RSS, PSS and USS of an idle taskvisor (taskvisor only).

Two set-ups run one after the other: one provider with one worker, then N providers
with 4 workers each (100 in full mode). Every provider uses the command driver and
gets no task, so every worker stays idle. Once every process has logged its start
and a few seconds have passed, the harness reads psutil's `memory_full_info()` of
the supervisor and of every process below it. Each process's role comes from the
`role[pid]` part of its log lines.

USS is the memory that only this process uses, so it is what ending the process
would free. PSS splits each shared page among the processes that map it, so the sum
of PSS over a set of processes is the memory that the set takes. The sum of RSS
counts every shared page once per process and overstates that.
"""

import os
import re
import statistics
import time

import psutil

from harness.environment import REPO_DIR, load_average
from harness.redis_server import PrivateRedis
from harness.systems import SYSTEMS, RunContext, RunningSystem

WORKERS_PER_PROVIDER = 4
# Seconds that every process gets to start and log it, with 400 workers on 2 cores.
START_DEADLINE_SECONDS = 600.0
# Seconds between the last process's start and the reading, so that start-up work is over.
SETTLE_SECONDS = 5.0
MIB = 1024 * 1024
# Every log line names its process as role[pid], for example worker:m-3:0[12345].
ROLE_PID = re.compile(r" (supervisor|intake|mirror|monitor|worker:[^\s\[]+)\[(\d+)\] ")


def providers_yaml(count: int, workers: int) -> str:
    concurrent = f"allowConcurrentTasks: true, maxConcurrentTasks: {workers}" if workers > 1 else "allowConcurrentTasks: false"
    return "".join(
        f"  m-{index}: {{{concurrent}, driver: {{type: command, commands: {{start: [/bin/true]}}}}}}\n"
        for index in range(count)
    )


def roles_from_log(log_path: str) -> dict[int, str]:
    roles: dict[int, str] = {}
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = ROLE_PID.search(line)
            if match:
                roles[int(match.group(2))] = match.group(1).split(":", 1)[0]
    return roles


class StartupError(Exception):
    """Not every taskvisor process started, so there is nothing to measure."""


def wait_until_started(running: RunningSystem, expected_workers: int) -> tuple[dict[int, str], float]:
    """Wait until every worker and the intake, mirror and monitor have logged a line.

    Returns the role of each pid and the seconds waited.
    """
    log_path = os.path.join(REPO_DIR, running.log_path)
    begin = time.monotonic()
    while time.monotonic() < begin + START_DEADLINE_SECONDS:
        if running.exited():
            raise StartupError(f"the supervisor exited during start-up; see {running.log_path}")
        roles = roles_from_log(log_path)
        counts = {role: list(roles.values()).count(role) for role in ("worker", "intake", "mirror", "monitor")}
        if counts["worker"] >= expected_workers and counts["intake"] and counts["mirror"] and counts["monitor"]:
            return roles, time.monotonic() - begin
        time.sleep(0.5)
    raise StartupError(f"not every process logged its start within {START_DEADLINE_SECONDS:g} s; see {running.log_path}")


def read_memory(supervisor_pid: int, roles: dict[int, str]) -> list[dict]:
    """Return role, pid, rss, pss and uss in bytes of the supervisor and every process below it."""
    supervisor = psutil.Process(supervisor_pid)
    readings = []
    for process in [supervisor, *supervisor.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        role = "supervisor" if process.pid == supervisor_pid else roles.get(process.pid, "other")
        readings.append({"role": role, "pid": process.pid, "rss": info.rss, "pss": info.pss, "uss": info.uss})
    return readings


def summarize_roles(readings: list[dict]) -> dict:
    """Group the readings by role: count, sums in MiB, and the median and maximum USS of one process."""
    summary = {}
    for role in sorted({reading["role"] for reading in readings}):
        group = [reading for reading in readings if reading["role"] == role]
        uss = [reading["uss"] / MIB for reading in group]
        summary[role] = {
            "processes": len(group),
            "uss_mib": round(sum(uss), 1),
            "pss_mib": round(sum(reading["pss"] for reading in group) / MIB, 1),
            "rss_mib": round(sum(reading["rss"] for reading in group) / MIB, 1),
            "uss_median_mib": round(statistics.median(uss), 2),
            "uss_max_mib": round(max(uss), 2),
            "rss_median_mib": round(statistics.median(reading["rss"] / MIB for reading in group), 2),
        }
    everything = summary.setdefault("all", {})
    everything.update({
        "processes": len(readings),
        "uss_mib": round(sum(reading["uss"] for reading in readings) / MIB, 1),
        "pss_mib": round(sum(reading["pss"] for reading in readings) / MIB, 1),
        "rss_mib": round(sum(reading["rss"] for reading in readings) / MIB, 1),
    })  # fmt: skip
    return summary


def leftover_processes(pids: list[int]) -> int:
    """Count the measured processes that still exist, zombies left out."""
    left = 0
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left += 1
        except psutil.NoSuchProcess:
            pass
    return left


def measure_setup(server: PrivateRedis, context: RunContext, providers: int, workers: int) -> dict:
    system = SYSTEMS["taskvisor"]
    server.flush()
    context.mode = "memory"
    context.label = f"memory-{providers}x{workers}"
    system.write_config(context, providers_yaml(providers, workers), extra="health: {port: 0}\n")
    result: dict = {"providers": providers, "workers_per_provider": workers, "load_average_before": load_average()}
    running = system.start(context)
    result["log"] = running.log_path
    readings: list[dict] = []
    try:
        roles, start_seconds = wait_until_started(running, providers * workers)
        result["start_seconds"] = round(start_seconds, 1)
        time.sleep(SETTLE_SECONDS)
        readings = read_memory(running.processes[0].pid, roles)
        info = server.client.info()
        result["redis_connected_clients"] = info["connected_clients"]
        result["redis_used_memory_mib"] = round(info["used_memory"] / MIB, 1)
        result["load_average_during"] = load_average()
    except StartupError as exc:
        result["error"] = str(exc)
    finally:
        # RunningSystem.stop() ends with SIGKILL to the supervisor's process group, so
        # nothing outlives it even when the supervisor hangs or the harness failed above.
        running.stop()
    result["clean_stop"] = running.clean_stop
    result["left_after_stop"] = leftover_processes([reading["pid"] for reading in readings])
    result["roles"] = summarize_roles(readings) if readings else {}
    return result


def measure_memory(server: PrivateRedis, context: RunContext, fleet_providers: int, progress) -> dict:
    results = {}
    for name, providers, workers in (("single", 1, 1), ("fleet", fleet_providers, WORKERS_PER_PROVIDER)):
        results[name] = measure_setup(server, context, providers, workers)
        everything = results[name]["roles"].get("all", {})
        progress(f"memory {name} ({providers} x {workers} workers): all processes USS {everything.get('uss_mib')} MiB,"
                 f" PSS {everything.get('pss_mib')} MiB, RSS {everything.get('rss_mib')} MiB; worker USS median"
                 f" {results[name]['roles'].get('worker', {}).get('uss_median_mib')} MiB; left after stop"
                 f" {results[name]['left_after_stop']} {results[name].get('error', '')}")  # fmt: skip
    return results
