"""Shared parts of the example host scripts: task input, SSH, output and exit status.

The command driver runs a host script as `SCRIPT TYPE INSTANCE ID` with the task as
one JSON object on stdin (docs/drivers.md, "The command driver"). The script prints
`progress N text` lines and, last, one JSON object as the task's result, and exits 0
on success. A failure that a retry cannot fix (invalid input, an instance that does
not exist) prints {"retry": false} and exits 2; any other failure exits 1. The
message goes to stderr, whose end becomes the task's error.

Every remote command is built as an argv list. ssh joins its arguments with spaces
and the remote user's shell parses the result, so `quote_command` quotes each
argument for a POSIX shell. Instance ids and data values are checked against strict
patterns before they reach a command, so the quoting is a second line of defence.

Only the standard library is used, so the scripts run with any Python 3.11 or newer.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

TASK_TYPES = ("create", "start", "stop", "restart", "delete", "reset", "reset-password")
# The protocol's rule for task ids (docs/protocol.md).
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# A host name, IPv4 or IPv6 address, or ssh_config alias; never a leading '-', which
# ssh would read as an option.
SSH_HOST_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:%-]{0,252}")
SSH_USER_PATTERN = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
# A Linux user name inside the guest, as useradd accepts by default.
GUEST_USER_PATTERN = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# An RFC 1123 host name label.
HOSTNAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_PASSWORD_LENGTH = 512

# Snapshot that `create` takes before the first start and `reset` rolls back to.
INITIAL_SNAPSHOT = "taskvisor-initial"
EXIT_FAILED = 1
EXIT_PERMANENT = 2
# Seconds that a graceful stop may take by default, before the backend forces it.
DEFAULT_STOP_TIMEOUT = 60


class HostError(Exception):
    """A failure that a later run may fix, such as an unreachable host or a busy guest."""


class PermanentError(HostError):
    """A failure that a retry cannot fix: invalid input, or an instance that does not exist."""


class Task:
    """The task of one run: its type, instance and id from argv, its timeout and data from stdin."""

    def __init__(self, task_type: str, instance: str, task_id: str, timeout: float, data: dict) -> None:
        self.type = task_type
        self.instance = instance
        self.task_id = task_id
        # Seconds that this run may take.
        self.timeout = timeout
        self.data = data

    @property
    def marker(self) -> str:
        """Text stored on a guest that `create` made, so that a probe can recognise it."""
        return f"taskvisor-task={self.task_id}"


def read_task(argv: Sequence[str], stdin_text: str) -> Task:
    """Parse `TYPE INSTANCE ID` and the task JSON; raises PermanentError when they are invalid."""
    if len(argv) != 3:
        raise PermanentError(
            f"expected 3 arguments TYPE INSTANCE ID, got {len(argv)}: configure the command as "
            f'["./SCRIPT", "{{type}}", "{{instance}}", "{{id}}"]'
        )
    task_type, instance, task_id = argv
    if task_type not in TASK_TYPES:
        raise PermanentError(f"unknown task type {task_type!r}: expected one of {', '.join(TASK_TYPES)}")
    if not TASK_ID_PATTERN.fullmatch(task_id):
        raise PermanentError(f"invalid task id {task_id!r}: expected 1-64 characters of A-Za-z0-9._:-")
    if not instance:
        raise PermanentError(
            f"the {task_type} task has no instance id: these scripts need the panel to choose it, also for create"
        )
    try:
        payload = json.loads(stdin_text)
    except ValueError as exc:
        raise PermanentError(f"the task on stdin is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PermanentError(f"the task on stdin must be a JSON object, got {type(payload).__name__}")
    data = payload.get("data") or {}
    if not isinstance(data, dict):
        raise PermanentError(f"field 'data' of the task must be a JSON object, got {type(data).__name__}")
    timeout = payload.get("timeout")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise PermanentError(f"field 'timeout' of the task must be a positive number, got {timeout!r}")
    return Task(task_type, instance, task_id, float(timeout), data)


def quote_command(argv: Sequence[str]) -> str:
    """Join `argv` into one command line that a POSIX shell splits back into the same argv."""
    for argument in argv:
        if "\0" in argument:
            raise PermanentError("a command argument contains a NUL byte, which no command line can carry")
    return " ".join(shlex.quote(argument) for argument in argv)


class Remote:
    """Runs commands on one host over SSH, with the settings from the provider's driver.env.

    `<PREFIX>_HOST` is required. `<PREFIX>_USER`, `<PREFIX>_PORT`, `<PREFIX>_IDENTITY`
    (a private key file), `<PREFIX>_CONNECT_TIMEOUT` (seconds, default 10) and
    `<PREFIX>_SUDO` (1: run each command through `sudo -n`) are optional. Other SSH
    settings, such as a jump host, belong in the ssh_config of the user that runs taskvisor.
    """

    def __init__(self, prefix: str, environ: Mapping[str, str]) -> None:
        self.host = self._setting(environ, prefix, "HOST", SSH_HOST_PATTERN, required=True)
        self.user = self._setting(environ, prefix, "USER", SSH_USER_PATTERN)
        self.port = self._setting(environ, prefix, "PORT", re.compile(r"[1-9][0-9]{0,4}"))
        self.identity = self._setting(environ, prefix, "IDENTITY", re.compile(r"[^-\0][^\0]*"))
        self.connect_timeout = self._setting(environ, prefix, "CONNECT_TIMEOUT", re.compile(r"[1-9][0-9]{0,3}")) or "10"
        self.sudo = environ.get(f"{prefix}_SUDO", "") in ("1", "true", "yes")

    @staticmethod
    def _setting(environ: Mapping[str, str], prefix: str, name: str, pattern: re.Pattern, required: bool = False) -> str:
        key = f"{prefix}_{name}"
        value = environ.get(key, "")
        if not value:
            if required:
                raise PermanentError(f"{key} is not set: add it to the provider's driver.env")
            return ""
        if not pattern.fullmatch(value):
            raise PermanentError(f"invalid value of {key} ({value!r}): expected a value matching {pattern.pattern}")
        return value

    def ssh_argv(self, remote_argv: Sequence[str]) -> list[str]:
        """Return the local ssh command line that runs `remote_argv` on the host."""
        argv = [
            "ssh",
            # Never prompt: a missing key or an unknown host key fails at once.
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={self.connect_timeout}",
            # Notice a dead connection within about 45 s instead of waiting for TCP.
            "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=3",
        ]  # fmt: skip
        if self.port:
            argv += ["-p", self.port]
        if self.identity:
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.user:
            argv += ["-l", self.user]
        command = ["sudo", "-n", "--", *remote_argv] if self.sudo else list(remote_argv)
        return [*argv, "--", self.host, quote_command(command)]

    def run(self, remote_argv: Sequence[str], input_text: str | None = None) -> subprocess.CompletedProcess:
        """Run a command on the host and return its exit status and output.

        Without `input_text` the remote stdin is empty: `incus create` and other tools
        read their stdin when it is not a terminal.
        """
        return subprocess.run(
            self.ssh_argv(remote_argv),
            input=input_text if input_text is not None else "",
            capture_output=True,
            text=True,
            check=False,
        )

    def call(self, remote_argv: Sequence[str], input_text: str | None = None) -> str:
        """Run a command on the host and return its stdout; raises HostError when it fails."""
        completed = self.run(remote_argv, input_text)
        if completed.returncode != 0:
            raise HostError(self.failure(remote_argv, completed))
        return completed.stdout

    def failure(self, remote_argv: Sequence[str], completed: subprocess.CompletedProcess) -> str:
        """Describe a failed remote command with the end of its stderr."""
        detail = completed.stderr.strip()[-2000:] or "no stderr output"
        return f"`{' '.join(remote_argv)}` on {self.host} failed with exit status {completed.returncode}: {detail}"


def progress(percent: int, text: str) -> None:
    print(f"progress {percent} {text}", flush=True)


def stop_timeout(task: Task, prefix: str, environ: Mapping[str, str]) -> int:
    """Return the seconds a graceful stop may take: `<PREFIX>_STOP_TIMEOUT`, at most half the task's timeout."""
    configured = environ.get(f"{prefix}_STOP_TIMEOUT", "")
    if configured and not re.fullmatch(r"[1-9][0-9]{0,4}", configured):
        raise PermanentError(f"invalid value of {prefix}_STOP_TIMEOUT ({configured!r}): expected whole seconds")
    seconds = int(configured) if configured else DEFAULT_STOP_TIMEOUT
    return max(1, min(seconds, int(task.timeout / 2)))


def integer_field(data: dict, name: str, default: int, low: int, high: int) -> int:
    """Return `data[name]` as an integer from `low` to `high`; raises PermanentError otherwise."""
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PermanentError(f"invalid data.{name} (value {value!r}): expected a whole number from {low} to {high}")
    return value


def text_field(data: dict, name: str, pattern: re.Pattern, default: str | None = None) -> str:
    """Return `data[name]` when it matches `pattern`; raises PermanentError when it is missing or does not."""
    value = data.get(name, default)
    if value is None:
        raise PermanentError(f"data.{name} is missing")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise PermanentError(f"invalid data.{name} (value {value!r}): expected a value matching {pattern.pattern}")
    return value


def check_known_fields(data: dict, known: Sequence[str]) -> None:
    """Reject fields the script does not read, so that a misspelt field is not dropped silently."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PermanentError(f"unknown field data.{unknown[0]}: this task type reads only {', '.join(known) or 'no fields'}")


def password_line(data: dict) -> tuple[str, str]:
    """Return the guest user and the `user:password` line for chpasswd from a reset-password task."""
    check_known_fields(data, ("username", "password"))
    username = text_field(data, "username", GUEST_USER_PATTERN, default="root")
    password = data.get("password")
    if not isinstance(password, str) or not password:
        raise PermanentError("data.password is missing: send the new password as a non-empty string")
    if len(password) > MAX_PASSWORD_LENGTH or any(character in password for character in "\n\r\0"):
        raise PermanentError(
            f"invalid data.password: at most {MAX_PASSWORD_LENGTH} characters without line breaks or NUL, "
            f"because chpasswd reads one user:password line"
        )
    return username, f"{username}:{password}\n"


class Backend:
    """One virtualisation backend; subclasses implement one method per task type and `probe`."""

    # Prefix of the driver.env variables, such as PVE for PVE_HOST.
    env_prefix = ""

    def __init__(self, task: Task, remote: Remote, environ: Mapping[str, str]) -> None:
        self.task = task
        self.remote = remote
        self.environ = environ

    def run(self) -> dict:
        method = getattr(self, self.task.type.replace("-", "_"))
        return method()

    def probe(self) -> dict:
        raise NotImplementedError

    def stop_timeout(self) -> int:
        return stop_timeout(self.task, self.env_prefix, self.environ)


def _load(backend: type[Backend], argv: Sequence[str], stdin_text: str, environ: Mapping[str, str]) -> Backend:
    task = read_task(argv, stdin_text)
    return backend(task, Remote(backend.env_prefix, environ), environ)


def main(backend: type[Backend]) -> None:
    """Run one task with `backend` and exit with the status the command driver expects."""
    try:
        result = _load(backend, sys.argv[1:], sys.stdin.read(), os.environ).run()
    except PermanentError as exc:
        print(json.dumps({"retry": False}), flush=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_PERMANENT)
    except HostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    progress(100, "done")
    print(json.dumps(result, sort_keys=True), flush=True)


def probe_main(backend: type[Backend]) -> None:
    """Print what an interrupted run did, as {"outcome": ...}; exits 1 when the probe fails."""
    try:
        answer = _load(backend, sys.argv[1:], sys.stdin.read(), os.environ).probe()
    except HostError as exc:
        # The worker fails the task when its probe fails, and stderr becomes the reason.
        print(f"error: probe failed: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    print(json.dumps(answer, sort_keys=True), flush=True)
