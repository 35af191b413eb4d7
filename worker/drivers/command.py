"""The `command` driver: runs one configured program per task type.

Each task type maps to an argv list in the provider's `driver.commands`. The program
runs without a shell, in a new session and process group, with the task as one JSON
object and a newline on stdin (`TaskContext.as_json_object`). It reports on stdout:

- `progress N [text]` reports N percent (a number, clamped to 0-100) with optional text.
- The last line that parses as a JSON object becomes the task result.
- Every other line is ignored, and so is any line longer than 1 MiB.

Exit status 0 completes the task. Any other status, or death by a signal, raises
TaskFailed with the end of stderr (at most 20 lines and 4 KiB) in the message and the
last JSON object from stdout, if any, as its `result`. When the task must stop, the
whole process group gets SIGTERM, then SIGKILL after `killGrace` seconds.

Placeholders: an argument that is exactly `{id}`, `{instance}`, `{user}`, `{provider}`
or `{type}` is replaced by that task value as one argument, whatever characters the
value contains. The config rejects a placeholder inside a longer argument, such as
`--name={instance}`. A value can start with `-`, so put `--` before it when the program
parses options.
"""

import contextlib
import logging
import math
import os
import selectors
import signal
import subprocess
import time

import orjson

from shared.errors import TaskFailed
from shared.settings import DriverConfig
from worker.drivers import reaping
from worker.drivers.base import Driver, ProbeAnswer, TaskContext

log = logging.getLogger(__name__)

# Maximum wait in the supervising loops. A stop request wakes them at once.
POLL_INTERVAL = 0.05
# Wait between two looks for the exit of a stopped program whose pipes are closed.
EXIT_POLL_INTERVAL = 0.005
# Selector data of the pipe that stop requests write to.
WAKEUP = "wakeup"
# Bytes read from or written to a pipe per call.
PIPE_CHUNK_BYTES = 65536
# A stdout line longer than this is dropped, so a program cannot fill the worker's memory.
MAX_LINE_BYTES = 1024 * 1024
STDERR_TAIL_BYTES = 4096
STDERR_TAIL_LINES = 20
# Seconds to keep reading the pipes after the program exits. A background process can
# keep stdout open, so the task ends after this time even without end of file.
EXIT_DRAIN_SECONDS = 0.5
# Seconds to wait for the program and its process group to go after SIGKILL.
KILL_WAIT_SECONDS = 10.0

STOP_DESCRIPTIONS = {
    "cancel": "the task was cancelled",
    "shutdown": "the worker is shutting down",
}


def substitute_placeholders(argv: list[str], context: TaskContext) -> list[str]:
    """Return argv with each argument that is exactly one placeholder replaced by its value."""
    values = {"{id}": context.task_id, "{instance}": context.instance, "{user}": context.user,
              "{provider}": context.provider, "{type}": context.task_type}
    return [values.get(arg, arg) for arg in argv]


def describe_exit(returncode: int) -> str:
    """Return "exited with status N" or "was killed by signal NAME (N)"."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    return f"was killed by signal {name} ({number})"


class OutputParser:
    """Stdout line parser (progress lines, last JSON object) and bounded stderr tail."""

    def __init__(self, context: TaskContext, tag: str) -> None:
        self.context = context
        self.tag = tag
        self.result: dict | None = None
        self.stdout_buffer = bytearray()
        self.skipping_long_line = False
        self.long_lines = 0
        self.progress_errors = 0
        self.stderr_tail = bytearray()

    def feed_stdout(self, data: bytes) -> None:
        self.stdout_buffer += data
        while True:
            end = self.stdout_buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self.stdout_buffer[:end])
            del self.stdout_buffer[: end + 1]
            if self.skipping_long_line:
                self.skipping_long_line = False
            else:
                self.parse_line(line)
        if len(self.stdout_buffer) > MAX_LINE_BYTES:
            self.stdout_buffer.clear()
            if not self.skipping_long_line:
                self.skipping_long_line = True
                self.long_lines += 1

    def finish_stdout(self) -> None:
        """Parse a last line that has no trailing newline."""
        if self.stdout_buffer and not self.skipping_long_line:
            self.parse_line(bytes(self.stdout_buffer))
        self.stdout_buffer.clear()
        if self.long_lines:
            log.warning("%s: dropped %d stdout lines longer than %d bytes", self.tag, self.long_lines, MAX_LINE_BYTES)
        if self.progress_errors:
            log.warning("%s: %d progress reports failed", self.tag, self.progress_errors)

    def parse_line(self, line: bytes) -> None:
        text = line.strip()
        if text.startswith(b"{"):
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                return
            if isinstance(value, dict):
                self.result = value
        elif text.startswith(b"progress"):
            self.parse_progress(text)

    def parse_progress(self, text: bytes) -> None:
        parts = text.decode("utf-8", "replace").split(None, 2)
        if len(parts) < 2 or parts[0] != "progress":
            return
        try:
            percent = float(parts[1])
        except ValueError:
            return
        if not math.isfinite(percent):
            return
        message = parts[2] if len(parts) == 3 else ""
        try:
            self.context.progress(percent, message)
        except Exception:
            # A failed report must not abandon a running program, so it is only counted.
            self.progress_errors += 1
            if self.progress_errors == 1:
                log.warning("%s: reporting progress failed", self.tag, exc_info=True)

    def feed_stderr(self, data: bytes) -> None:
        self.stderr_tail += data
        if len(self.stderr_tail) > STDERR_TAIL_BYTES:
            del self.stderr_tail[: len(self.stderr_tail) - STDERR_TAIL_BYTES]

    def stderr_text(self) -> str:
        """Return the last STDERR_TAIL_LINES lines of the stderr tail."""
        text = self.stderr_tail.decode("utf-8", "replace").strip()
        return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])


class CommandRun:
    """One running program: feeds its stdin, reads its output and stops it on request."""

    def __init__(self, process: subprocess.Popen, context: TaskContext, stdin_data: bytes) -> None:
        self.process = process
        self.context = context
        # Not `pid=`: in JSON lines that key is the worker's pid, and the command's would be lost.
        self.tag = f"task_id={context.task_id} provider={context.provider} command_pid={process.pid}"
        self.output = OutputParser(context, self.tag)
        self.pending_input = memoryview(stdin_data)
        self.selector = selectors.DefaultSelector()
        for stream in (process.stdout, process.stderr):
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, selectors.EVENT_READ)
        os.set_blocking(process.stdin.fileno(), False)
        self.selector.register(process.stdin, selectors.EVENT_WRITE)
        # A stop request writes to this pipe, so a select() that waits for output returns
        # at once instead of after its poll interval.
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self.wakeup_write, False)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, WAKEUP)
        context.on_stop(self._wake_up)

    def _wake_up(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.wakeup_write, b"x")

    def supervise(self) -> bool:
        """Pump stdin and output until the program exits (return True) or the task must stop (False)."""
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if self.process.poll() is not None:
                if drain_until is None:
                    drain_until = now + EXIT_DRAIN_SECONDS
                if now >= drain_until or not self.streams_open():
                    return True
            elif self.context.cancelled.is_set():
                return False
            elif now >= self.context.deadline:
                self.context.stop("timeout")
                return False
            if drain_until is None:
                self.pump(min(POLL_INTERVAL, self.context.deadline - now))
            else:
                self.pump(POLL_INTERVAL)

    def streams_open(self) -> bool:
        return any(key.data is not WAKEUP for key in self.selector.get_map().values())

    def pump(self, timeout: float) -> None:
        if not self.streams_open():
            if self.context.cancelled.is_set():
                time.sleep(timeout)
            else:
                self.context.cancelled.wait(timeout)
            return
        for key, _ in self.selector.select(timeout):
            if key.data is WAKEUP:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wakeup_read, 64)
            elif key.fileobj is self.process.stdin:
                self.write_input()
            else:
                self.read_output(key.fileobj)

    def write_input(self) -> None:
        try:
            written = os.write(self.process.stdin.fileno(), self.pending_input[:PIPE_CHUNK_BYTES])
        except BlockingIOError:
            return
        except BrokenPipeError:
            log.debug("%s: command closed stdin before reading the whole task", self.tag)
            written = len(self.pending_input)
        self.pending_input = self.pending_input[written:]
        if not self.pending_input:
            self.close_stream(self.process.stdin)

    def read_output(self, stream) -> None:
        try:
            data = os.read(stream.fileno(), PIPE_CHUNK_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.close_stream(stream)
        elif stream is self.process.stdout:
            self.output.feed_stdout(data)
        else:
            self.output.feed_stderr(data)

    def close_stream(self, stream) -> None:
        self.selector.unregister(stream)
        with contextlib.suppress(BrokenPipeError):
            stream.close()

    def close(self) -> None:
        """Close the pipes that are still open and parse the last stdout line."""
        for key in list(self.selector.get_map().values()):
            if key.data is WAKEUP:
                self.selector.unregister(key.fileobj)
            else:
                self.close_stream(key.fileobj)
        self.selector.close()
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)
        self.output.finish_stdout()

    def terminate(self) -> bool:
        """Send SIGTERM to the process group, SIGKILL after the grace period, and return whether SIGKILL was sent."""
        group = self.process.pid
        log.warning("%s: stopping command (%s), sending SIGTERM to its process group", self.tag, self.context.stop_reason)
        signal_group(group, signal.SIGTERM)
        if self.wait_for_group(time.monotonic() + self.context.kill_grace):
            return False

        log.warning("%s: process group still running after %g s, sending SIGKILL", self.tag, self.context.kill_grace)
        signal_group(group, signal.SIGKILL)
        if not self.wait_for_group(time.monotonic() + KILL_WAIT_SECONDS):
            log.error("%s: process group still present %g s after SIGKILL", self.tag, KILL_WAIT_SECONDS)
        return True

    def wait_for_group(self, deadline: float) -> bool:
        """Wait until the program is reaped and its process group is empty, and return False at the deadline."""
        while True:
            if self.process.poll() is not None:
                reap_group(self.process.pid)
                if not group_exists(self.process.pid):
                    return True
            if time.monotonic() >= deadline:
                return False
            # Keep reading, so a program that writes while shutting down does not block on a
            # full pipe. Once its pipes are closed, look for its exit more often.
            self.pump(POLL_INTERVAL if self.streams_open() else EXIT_POLL_INTERVAL)


def signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def group_exists(group: int) -> bool:
    """Return whether any process, zombies included, is still in the process group."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def reap_group(group: int) -> None:
    """Reap exited children in the process group.

    Call it only after Popen has reaped the group leader. Before that, the leader itself
    is in the group, and reaping it here would hide its exit status from Popen.
    """
    while True:
        try:
            pid, _ = os.waitpid(-group, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class CommandDriver(Driver):
    """Driver that runs a configured program for each task type (see the module docstring)."""

    def __init__(self, provider: str, config: DriverConfig, base_dir: str) -> None:
        super().__init__(provider, config.options)
        self.config = config
        self.workdir = os.path.join(base_dir, config.workdir) if config.workdir else base_dir
        reaping.enable_child_subreaper()

    def run(self, context: TaskContext) -> dict | None:
        """Run the command configured for `context.task_type` and return its JSON result.

        Raises TaskFailed when there is no command for the type, when the program cannot
        be started, when it exits with a nonzero status or a signal, and when the task had
        to stop. In the last case `context.stop_reason` contains the reason.
        """
        argv = self.config.commands.get(context.task_type)
        if not argv:
            raise TaskFailed(f"provider {self.provider} has no command for task type {context.task_type}")
        return self.run_argv(argv, context)

    create = start = stop = restart = delete = reset = reset_password = run

    def has_probe(self, task_type: str) -> bool:
        return task_type in self.config.probes

    def probe(self, context: TaskContext) -> ProbeAnswer:
        """Run the probe command of the task's type and read its answer.

        The probe gets the same stdin, placeholders and environment as the task's command,
        and prints one JSON object such as {"outcome": "not_done"}, {"outcome": "completed",
        "result": {...}} or {"outcome": "failed", "error": "..."}.
        """
        argv = self.config.probes.get(context.task_type)
        if not argv:
            raise TaskFailed(f"provider {self.provider} has no probe for task type {context.task_type}")
        answer = self.run_argv(argv, context) or {}
        outcome = answer.get("outcome")
        if outcome not in ProbeAnswer.OUTCOMES:
            raise TaskFailed(
                f"probe of {context.task_type} printed no valid outcome (got {str(outcome)[:80]!r}); "
                f"expected a JSON object with outcome {', '.join(ProbeAnswer.OUTCOMES)}"
            )
        result = answer.get("result")
        return ProbeAnswer(outcome, result if isinstance(result, dict) else None, str(answer.get("error") or ""))

    def run_argv(self, argv: list[str], context: TaskContext) -> dict | None:
        """Run one configured argv for the task and return its JSON result (see `run`)."""
        if not context.cancelled.is_set() and time.monotonic() >= context.deadline:
            context.stop("timeout")
        if context.cancelled.is_set():
            raise TaskFailed(f"command not started: {stop_description(context)}")

        process = self.start_process(substitute_placeholders(argv, context), context)
        run = CommandRun(process, context, orjson.dumps(context.as_json_object()) + b"\n")
        started = time.monotonic()
        try:
            exited = run.supervise()
            killed = False if exited else run.terminate()
        finally:
            self.finish_process(run)
        duration = time.monotonic() - started

        if not exited:
            signal_text = "SIGTERM, then SIGKILL" if killed else "SIGTERM"
            message = f"command stopped with {signal_text} because {stop_description(context)}"
            raise TaskFailed(message, result=run.output.result)
        return self.outcome(run, duration)

    def start_process(self, argv: list[str], context: TaskContext) -> subprocess.Popen:
        environment = {**os.environ, **self.config.env}
        environment.update(TASKVISOR_TASK_ID=context.task_id, TASKVISOR_PROVIDER=context.provider,
                           TASKVISOR_TASK_TYPE=context.task_type, TASKVISOR_INSTANCE=context.instance)
        pipe = subprocess.PIPE
        with reaping.running_pids_lock:
            try:
                process = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, cwd=self.workdir,
                                           env=environment, start_new_session=True)
            except OSError as exc:
                message = f"command {argv[0]} could not be started (working directory {self.workdir}): {exc}"
                raise TaskFailed(message) from exc
            reaping.running_pids.add(process.pid)
        log.info("task_id=%s provider=%s command_pid=%d: started %s command %s",
                 context.task_id, context.provider, process.pid, context.task_type, argv[0])
        return process

    def finish_process(self, run: CommandRun) -> None:
        """Close the pipes, reap the program (killing its group on an error) and reap orphans."""
        process = run.process
        try:
            run.close()
        finally:
            if process.poll() is None:
                log.error("%s: killing the process group after an error", run.tag)
                signal_group(process.pid, signal.SIGKILL)
            try:
                process.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("%s: command did not exit %g s after SIGKILL", run.tag, KILL_WAIT_SECONDS)
            with reaping.running_pids_lock:
                reaping.running_pids.discard(process.pid)
            reaping.reap_orphans()

    def outcome(self, run: CommandRun, duration: float) -> dict | None:
        returncode = run.process.returncode
        log.info("%s: command %s after %.2f s", run.tag, describe_exit(returncode), duration)
        if returncode == 0:
            return run.output.result
        stderr = run.output.stderr_text()
        detail = f": {stderr}" if stderr else " with no stderr output"
        raise TaskFailed(f"command {describe_exit(returncode)}{detail}", result=run.output.result)


def stop_description(context: TaskContext) -> str:
    if context.stop_reason == "timeout":
        return f"the task timed out after {context.timeout:g} s"
    return STOP_DESCRIPTIONS.get(context.stop_reason, f"a stop was requested ({context.stop_reason})")
