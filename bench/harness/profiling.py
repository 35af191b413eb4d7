"""Sampling profiles of taskvisor's processes with py-spy while they drain a backlog.

`bench/run.py --profile` starts taskvisor like a throughput run, attaches one
`py-spy record` to each worker, the intake, the mirror, the monitor and the supervisor, takes one
`py-spy dump` of each, and writes the top frames to bench/results/profile-<name>.md. The raw
collapsed stacks stay in bench/scratch/<name>/profile/ for flame graph tools.
"""

import collections
import os
import re
import signal
import subprocess
import time

import psutil

from harness.environment import REPO_DIR, venv_python
from harness.measure import run_producer, wait_for_count
from harness.redis_server import PrivateRedis
from harness.systems import SYSTEMS, RunContext

# Samples per second of each py-spy recorder.
SAMPLE_RATE = 100
TOP_FRAMES = 15
STARTED_LINE = re.compile(r" (\S+)\[(\d+)\] \S+: (?:(?:worker|intake|mirror|supervisor) started|health endpoint listening)")


def wait_for_processes(log_path: str, expected: int, timeout: float) -> dict[str, int]:
    """Return the pid of each process (worker:<provider>:<slot>, intake, mirror, monitor, supervisor) once `expected` have logged their start."""
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    while time.monotonic() < deadline and len(found) < expected:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                match = STARTED_LINE.search(line)
                if match:
                    found[match.group(1)] = int(match.group(2))
        time.sleep(0.02)
    return found


def read_collapsed(path: str) -> list[tuple[list[str], int]]:
    """Read py-spy's raw output: one `frame;frame;... count` line per distinct stack, root first."""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks.append((stack.split(";"), int(count)))
    return stacks


# Frames of taskvisor's own packages and of the benchmark driver.
OWN_CODE = re.compile(r"\((?:supervisor|worker|shared)/[^)]*\)$|\(noop_driver\.py\)$")
# The fork path from the supervisor into each child is in every stack of a child, so
# these frames are left out of the inclusive table.
FORK_PATH = re.compile(r"\(supervisor/(?:cli|__main__|main|children)\.py\)$")


def is_own_frame(frame: str) -> bool:
    return OWN_CODE.search(frame) is not None and FORK_PATH.search(frame) is None


# Categories of samples, judged by their frames. The first category that matches wins.
CATEGORIES = [
    ("logging", lambda frames: any("(logging/" in frame for frame in frames)),
    ("Redis socket I/O and hiredis reply parsing", lambda frames: re.search(
        r"send_packed_command|read_from_socket|_socket_can_read|readinto|recv", frames[-1]) is not None),
    ("SQLite (sqlite3 calls inside the store)", lambda frames: "(shared/store/sqlite.py)" in frames[-1]),
    ("redis-py command building and reply parsing", lambda frames: "(redis/" in frames[-1]),
    ("thread start and join", lambda frames: "(threading.py)" in frames[-1]),
    ("taskvisor code (own samples)", lambda frames: is_own_frame(frames[-1])),
    ("other", lambda frames: True),
]


def categorize(stacks: list[tuple[list[str], int]]) -> list[tuple[str, int]]:
    totals: collections.Counter = collections.Counter()
    for frames, count in stacks:
        for name, matches in CATEGORIES:
            if matches(frames):
                totals[name] += count
                break
    return totals.most_common()


def top_frames(stacks: list[tuple[list[str], int]]) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Return the sample total, the top leaf frames, and the top taskvisor frames by inclusive samples."""
    total = sum(count for _frames, count in stacks)
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for frame in set(frames):
            if is_own_frame(frame):
                inclusive[frame] += count
    return total, own.most_common(TOP_FRAMES), inclusive.most_common(TOP_FRAMES)


def process_cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds that process `pid` has used so far, its threads included."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def cpu_markdown(cpu_used: dict[str, float], count: int, seconds: float) -> list[str]:
    """Return a Markdown table of the CPU that each process used while the backlog drained."""
    total = sum(cpu_used.values())
    lines = [
        "### CPU by process",
        "",
        (f"User + system CPU time from psutil (redis-server: `INFO cpu`) between the start of sampling and the"
         f" last task recorded, {seconds:.1f} s. py-spy's own CPU is not included. Total: {total:.2f} s, or"
         f" {1000 * total / count:.3f} ms per task."),
        "",
        "| Process | CPU s | ms per task | Share of one core |",
        "|---|---:|---:|---:|",
    ]  # fmt: skip
    for role, used in sorted(cpu_used.items(), key=lambda item: -item[1]):
        lines.append(f"| {role} | {used:.2f} | {1000 * used / count:.3f} | {100 * used / seconds:.0f} % |")
    return lines + [""]


def commands_markdown(command_stats: dict, count: int) -> list[str]:
    """Return a Markdown table of the Redis commands run while the backlog drained (`INFO commandstats`)."""
    rows = sorted(command_stats.items(), key=lambda item: -item[1]["usec"])
    lines = [
        "### Redis commands",
        "",
        ("From `INFO commandstats`, reset when sampling started. Commands that scripts run are counted both on"
         " their own and in the time of the `evalsha` that ran them. The harness's own polling is included."),
        "",
        "| Command | Calls per task | Total µs per task | µs per call |",
        "|---|---:|---:|---:|",
    ]  # fmt: skip
    for name, stats in rows[:TOP_FRAMES]:
        lines.append(f"| {name.removeprefix('cmdstat_')} | {stats['calls'] / count:.2f} | {stats['usec'] / count:.1f} |"
                     f" {stats['usec_per_call']:.2f} |")
    return lines + [""]


def summary_markdown(role: str, path: str, seconds: float) -> list[str]:
    stacks = read_collapsed(path)
    total, own, inclusive = top_frames(stacks)
    possible = max(1, int(seconds * SAMPLE_RATE))
    share = 100 * total / possible
    lines = [
        f"### {role}",
        "",
        (f"{total:,} samples that py-spy did not mark idle, of about {possible:,} in {seconds:.1f} s at"
         f" {SAMPLE_RATE} Hz ({share:.0f} % of the wall time, all threads added up). A sample counts when its"
         " thread was running or runnable, so on a saturated machine it includes waiting for a CPU."),
        "",
        "| Samples | % | Spent in |",
        "|---:|---:|---|",
    ]  # fmt: skip
    lines += [f"| {count:,} | {100 * count / max(total, 1):.1f} | {name} |" for name, count in categorize(stacks)]
    lines += ["", "| Own samples | % | Frame (leaf) |", "|---:|---:|---|"]
    lines += [f"| {count:,} | {100 * count / max(total, 1):.1f} | `{frame}` |" for frame, count in own]
    lines += ["", "| Inclusive samples | % | taskvisor frame (anywhere in the stack) |", "|---:|---:|---|"]
    lines += [f"| {count:,} | {100 * count / max(total, 1):.1f} | `{frame}` |" for frame, count in inclusive]
    return lines + [""]


def profile_taskvisor(server: PrivateRedis, context: RunContext, count: int, output_path: str, results: dict,
                      sample: bool = True) -> None:
    """Profile one drain of `count` tasks. Without `sample`, count each process's CPU with no py-spy attached."""
    system = SYSTEMS["taskvisor"]
    py_spy = os.path.join(os.path.dirname(venv_python("peers")), "py-spy")
    output_dir = os.path.join(context.scratch, "profile")
    os.makedirs(output_dir, exist_ok=True)

    server.flush()
    context.mode = "throughput"
    context.label = "profile"
    system.prepare(context)
    run_producer(system, context, ["backlog", str(count)])
    running = system.start(context)
    recorders: dict[str, subprocess.Popen] = {}
    try:
        # The workers, the intake, the mirror, the monitor and the supervisor.
        processes = wait_for_processes(os.path.join(REPO_DIR, running.log_path), expected=context.concurrency + 4,
                                       timeout=15)
        cpu_before = {role: process_cpu_seconds(pid) for role, pid in processes.items()}
        redis_cpu_before = server.cpu_seconds()
        server.client.config_resetstat()
        begin = time.perf_counter()
        for role, pid in processes.items() if sample else ():
            path = os.path.join(output_dir, f"{role.replace(':', '-')}.txt")
            recorders[role] = subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--format", "raw", "--nolineno",
                 "--nonblocking", "--output", path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for role, pid in processes.items() if sample else ():
            time.sleep(1.0 / len(processes))
            dump = subprocess.run([py_spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                                  check=False)
            with open(os.path.join(output_dir, f"{role.replace(':', '-')}-dump.txt"), "w", encoding="utf-8") as handle:
                handle.write(dump.stdout + dump.stderr)
        _first, done = wait_for_count(server.client, running, count, time.perf_counter() + 600)
        while done is not None and not system.all_recorded(context, count):
            time.sleep(0.01)
        seconds = time.perf_counter() - begin
        cpu_used = {role: process_cpu_seconds(pid) - cpu_before[role] for role, pid in processes.items()}
        cpu_used["redis-server"] = server.cpu_seconds() - redis_cpu_before
        command_stats = server.client.info("commandstats")
    finally:
        for recorder in recorders.values():
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders.values():
            recorder.wait(30)
        running.stop()

    if sample:
        sampler = (f"while py-spy {results['versions']['peers_environment']['py-spy']} sampled every process"
                   f" ({SAMPLE_RATE} Hz, --nonblocking, idle samples left out, one py-spy per process).")
    else:
        sampler = "with no sampler attached (--cpu-only)."
    lines = [
        "# taskvisor profile",
        "",
        f"- Date: {results['date']}",
        f"- Command: `{results['command']}`",
        f"- taskvisor commit: {results['versions']['taskvisor_commit']}",
        f"- Machine: {results['machine']['cores']} cores, {results['machine']['cpu_model']}",
        (f"- Workload: a backlog of {count:,} no-op tasks at concurrency {context.concurrency},"
         f" as in the throughput measurement; drained and mirrored in {seconds:.1f} s {sampler}"),
        f"- Load average at start: {results['load_average_start']}",
    ]  # fmt: skip
    if sample:
        lines.append(f"- Raw collapsed stacks and one dump per process: {os.path.relpath(output_dir, REPO_DIR)}")
    lines.append("")
    lines += cpu_markdown(cpu_used, count, seconds)
    lines += commands_markdown(command_stats, count)
    for role in sorted(recorders):
        lines += summary_markdown(role, os.path.join(output_dir, f"{role.replace(':', '-')}.txt"), seconds)
    text = "\n".join(lines).rstrip() + "\n"
    with open(output_path, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
