"""The cancel measurement: how long a system takes to stop a running 30-second task.

Each repetition submits one task that runs `sleep 30` (or sleeps in a pool process,
for the celery-pool row) and records the pid of the sleeping process. Two seconds after
that process started, bench/apps/cancel_client.py calls the system's cancel API. The
harness then polls that pid with psutil, and for taskvisor the task's status in its
status hash, every millisecond, until the process is gone and the status is
`cancelled`. A process counts as gone once it has exited, as a zombie or reaped.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import psutil
import redis

from harness.environment import load_average
from harness.redis_server import PrivateRedis
from harness.stats import nearest_rank
from harness.systems import (
    APPS_DIR,
    SYSTEMS,
    TASKVISOR_PREFIX,
    TASKVISOR_PROVIDER,
    RunContext,
    System,
)

# Seconds from the start of the sleeping process to the cancel call.
CANCEL_AFTER_SECONDS = 2.0
# Seconds after the cancel call after which a process that still runs counts as not stopped.
GONE_DEADLINE_SECONDS = 5.0
# Seconds between two looks at the process and the status hash.
POLL_SECONDS = 0.001
# Seconds that a submitted task may take to start. For the first task this includes the workers' start-up.
START_DEADLINE_SECONDS = 60.0
# Seconds that the cancel client may take to reply to one command.
CLIENT_TIMEOUT_SECONDS = 30.0


@dataclass
class CancelRow:
    """One row of the cancel table: the system whose workers run, and the cancel client that drives them."""

    name: str
    system: str
    client: str
    description: str
    # Why the system cannot stop a running task, which the report shows instead of numbers. Empty when it can.
    unsupported: str = ""


ROWS = [
    CancelRow("taskvisor", "taskvisor", "taskvisor",
              "command driver running `/bin/sh bench/apps/sleep_task.sh`, which records its pid and execs `sleep 30`;"
              " cancelled with HSET cancel_request_user/cancel_request_reason, then PUBLISH on"
              " tvbench:cancel (docs/protocol.md); driver.killGrace 5 s"),
    CancelRow("celery", "celery", "celery",
              "the task runs `sleep 30` with subprocess.Popen in the prefork pool process and waits for it;"
              " `app.control.revoke(task_id, terminate=True, signal=\"SIGTERM\")`; the measured pid is the sleep"),
    CancelRow("celery-pool", "celery", "celery-pool",
              "the task sleeps 30 s with time.sleep in the prefork pool process;"
              " `app.control.revoke(task_id, terminate=True, signal=\"SIGTERM\")`; the measured pid is the pool process"),
    CancelRow("rq-fork", "rq-fork", "rq",
              "the job runs `sleep 30` with subprocess.Popen in the work horse and waits for it;"
              " `rq.command.send_stop_job_command`; the measured pid is the sleep"),
    CancelRow("rq-simple", "rq-simple", "rq", "SimpleWorker",
              unsupported="rq 2.12's stop-job command kills the work horse, and SimpleWorker has none"
                          " (its kill_horse does nothing), so a job that runs in a SimpleWorker cannot be"
                          " stopped. Use the forking worker (rq-fork row)."),
    CancelRow("arq", "arq", "arq",
              "the job runs `sleep 30` with asyncio.create_subprocess_exec and awaits it; the worker has"
              " allow_abort_jobs; `Job.abort()`, which cancels the job's coroutine; the measured pid is the sleep"),
    CancelRow("dramatiq", "dramatiq", "",
              "Redis broker",
              unsupported="Dramatiq 2.2.1 has no call that stops a running message: its TimeLimit middleware"
                          " interrupts an actor only when the actor's time limit runs out. Aborting a running"
                          " message needs a third-party middleware, which this benchmark does not install."),
]  # fmt: skip


class ClientError(Exception):
    """The cancel client did not reply: it exited, or it took longer than its time limit."""


class CancelClient:
    """bench/apps/cancel_client.py running in the system's environment, with one JSON reply per command."""

    def __init__(self, system: System, context: RunContext, client: str) -> None:
        log_path = os.path.join(context.scratch, "logs", f"cancel-client-{client}.log")
        self.log_handle = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [system.python, os.path.join(APPS_DIR, "cancel_client.py"), client], cwd=APPS_DIR,
            env=context.environment(system.uses_taskvisor), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log_handle, text=True, start_new_session=True,
        )  # fmt: skip
        # The Celery client first waits until the worker replies to a ping.
        self.read_reply(START_DEADLINE_SECONDS + CLIENT_TIMEOUT_SECONDS)

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def read_reply(self, timeout: float = CLIENT_TIMEOUT_SECONDS) -> dict:
        """Read one JSON reply. The client replies within seconds, so a missing reply means it failed."""
        # The client writes one line per command and the harness reads each line before
        # it sends the next command, so no reply waits in the pipe's read buffer here.
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise ClientError(f"the cancel client timed out: no reply within {timeout:g} s;"
                              f" see {self.log_handle.name}")  # fmt: skip
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(CLIENT_TIMEOUT_SECONDS)
            raise ClientError(f"the cancel client exited with status {self.process.returncode}; see {self.log_handle.name}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(CLIENT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_handle.close()


def wait_for_pid_file(path: str, deadline: float) -> tuple[int, float] | None:
    """Return the pid and start time that the task recorded, or None at the deadline."""
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="ascii") as handle:
                pid_text, started_text = handle.read().split()
            return int(pid_text), float(started_text)
        except FileNotFoundError:
            time.sleep(0.005)
    return None


def process_gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cancel_once(client: CancelClient, redis_client: redis.Redis, context: RunContext, name: str,
                check_status: bool) -> dict:  # fmt: skip
    """Submit one 30-second task, cancel it 2 s after it started, and time the stop."""
    client.send(f"submit {name}")
    client.read_reply()
    recorded = wait_for_pid_file(os.path.join(context.pid_dir, f"{name}.pid"), time.monotonic() + START_DEADLINE_SECONDS)
    if recorded is None:
        return {"task": name, "error": f"the task did not start within {START_DEADLINE_SECONDS:g} s"}
    pid, started = recorded
    try:
        process = psutil.Process(pid)
        parent = process.parent()
    except psutil.NoSuchProcess:
        return {"task": name, "pid": pid, "error": "the task's process ended before the cancel"}
    time.sleep(max(0.0, started + CANCEL_AFTER_SECONDS - time.time()))

    status_key = f"{TASKVISOR_PREFIX}:{{{TASKVISOR_PROVIDER}}}:task:{name}"
    status = b""
    gone_at = cancelled_at = parent_gone_at = None
    client.send(f"cancel {name}")
    deadline = time.time() + GONE_DEADLINE_SECONDS
    while time.time() < deadline:
        now = time.time()
        if gone_at is None and process_gone(process):
            gone_at = now
        # The parent (a worker, pool process or work horse) is watched too, because some
        # systems end it and leave the task's own process running.
        if parent_gone_at is None and parent is not None and process_gone(parent):
            parent_gone_at = now
        if check_status and cancelled_at is None:
            status = redis_client.hget(status_key, "status") or b""
            if status == b"cancelled":
                cancelled_at = now
        if gone_at is not None and (cancelled_at is not None or not check_status):
            break
        time.sleep(POLL_SECONDS)
    reply = client.read_reply()

    result: dict = {"task": name, "pid": pid, "call_ms": round((reply["returned_at"] - reply["sent_at"]) * 1000, 3)}
    if parent is not None:
        result["parent_pid"] = parent.pid
    if parent_gone_at is not None:
        result["parent_gone_ms"] = round((parent_gone_at - reply["sent_at"]) * 1000, 3)
    if gone_at is not None:
        result["gone_ms"] = round((gone_at - reply["sent_at"]) * 1000, 3)
    else:
        # The process outlived the cancel. The benchmark's task started it, so the harness
        # ends it here, before the next repetition.
        result["error"] = f"the process was still running {GONE_DEADLINE_SECONDS:g} s after the cancel call"
        result["survived"] = True
        stop_survivor(process)
    if check_status:
        result["final_status"] = status.decode()
        if cancelled_at is not None:
            result["cancelled_ms"] = round((cancelled_at - reply["sent_at"]) * 1000, 3)
        else:
            result.setdefault("error", f"status {status.decode() or 'missing'}, not cancelled, {GONE_DEADLINE_SECONDS:g} s after the cancel call")
    if "error" not in result:
        result["stopped_ms"] = max(result["gone_ms"], result.get("cancelled_ms", 0.0))
    return result


def stop_survivor(process: psutil.Process) -> None:
    """Send SIGKILL and wait up to 5 s for the process to be reaped. Its parent may keep the zombie longer."""
    try:
        process.send_signal(signal.SIGKILL)
        process.wait(5)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


def measure_cancel_row(server: PrivateRedis, row: CancelRow, context: RunContext, repetitions: int) -> dict:
    """Run `repetitions` cancels against one system's workers, started once for the whole row."""
    system = SYSTEMS[row.system]
    summary: dict = {"description": row.description, "repetitions": repetitions}
    if row.unsupported:
        summary["unsupported"] = row.unsupported
        return summary

    server.flush()
    shutil.rmtree(context.pid_dir, ignore_errors=True)
    os.makedirs(context.pid_dir)
    context.mode = "cancel"
    context.label = f"cancel-{row.name}"
    system.prepare(context)
    summary["load_average_before"] = load_average()
    running = system.start(context)
    client = None
    runs = []
    try:
        client = CancelClient(system, context, row.client)
        for index in range(repetitions):
            runs.append(cancel_once(client, server.client, context, f"c-{index}", check_status=row.system == "taskvisor"))
            if "error" in runs[-1] and not runs[-1].get("survived"):
                break
    except ClientError as exc:
        summary["error"] = str(exc)
    finally:
        if client is not None:
            client.close()
        running.stop()
    summary.update({"runs": runs, "log": running.log_path, "clean_stop": running.clean_stop,
                    "load_average_after": load_average()})  # fmt: skip
    summarize_row(summary)
    return summary


def summarize_row(summary: dict) -> None:
    """Add nearest-rank p50, p99 and max of each measured span over the repetitions."""
    runs = summary["runs"]
    summary["measured"] = sum(1 for run in runs if "stopped_ms" in run)
    summary["survived"] = sum(1 for run in runs if run.get("survived"))
    summary["parent_gone"] = sum(1 for run in runs if "parent_gone_ms" in run)
    for key in ("stopped_ms", "gone_ms", "cancelled_ms", "call_ms", "parent_gone_ms"):
        values = sorted(run[key] for run in runs if key in run)
        if values:
            prefix = key.removesuffix("_ms")
            summary[f"{prefix}_p50_ms"] = round(nearest_rank(values, 0.50), 3)
            summary[f"{prefix}_p99_ms"] = round(nearest_rank(values, 0.99), 3)
            summary[f"{prefix}_max_ms"] = round(values[-1], 3)


def measure_cancel(server: PrivateRedis, context: RunContext, systems: list[str], repetitions: int, progress) -> dict:
    results = {}
    for row in ROWS:
        if row.system not in systems:
            continue
        results[row.name] = measure_cancel_row(server, row, context, repetitions)
        summary = results[row.name]
        progress(f"cancel {row.name}: p50={summary.get('stopped_p50_ms')} ms p99={summary.get('stopped_p99_ms')} ms"
                 f" measured={summary.get('measured', 0)}/{repetitions} survived={summary.get('survived', 0)}"
                 f" load={summary.get('load_average_before', ['-'])[0]}")  # fmt: skip
    return results
