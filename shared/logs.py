"""Logging set-up shared by the supervisor, its children and the CLI.

Every process writes to stderr through one handler, set up by `setup_logging` in the
`taskvisor` command before the supervisor forks anything, so the children inherit it.
The handler:

- writes plain text lines (the default) or one JSON object per line;
- masks the password of any URL in a message, as a last guard behind the call sites,
  which already redact task data and URLs;
- lets through the same warning or error line of one process at most once per
  REPEAT_WINDOW_SECONDS, and reports the suppressed copies in a summary line.

A second handler writes nothing: it counts the lines that report a lost connection
to Redis or the database in the process's heartbeat slot, for /metrics.
"""

import ast
import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

import orjson

from shared import heartbeat
from shared.process import current_pid

LOG_FORMATS = ("text", "json")
# Seconds during which repeats of one warning or error line are counted instead of written.
REPEAT_WINDOW_SECONDS = 30.0
# Log lines that report a lost connection, as (logger name prefix, start of the format
# string, target). The processes retry after each of them.
RECONNECT_MESSAGES = (
    ("", "redis unavailable", "redis"),
    ("worker.watchers", "cancel watcher lost redis", "redis"),
    ("supervisor.mirror", "database write failed", "database"),
    ("shared.store.mysql", "%s on %s lost the connection", "database"),
)
# The password part of `scheme://user:password@host`.
URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@]*@")
# `key=value` pairs in our messages. Keys that usually end a message and may contain
# spaces take the rest of the line; the others end at the next space.
KEY_VALUE = re.compile(r"(?:^|\s)([a-z][a-z0-9_]*)=(\S*)")
REST_OF_LINE_KEYS = ("error", "reason")
# Fields of every JSON line; a parsed key with one of these names is left out.
JSON_BASE_FIELDS = ("time", "level", "role", "pid", "logger", "message", "repeated", "exception")

# Name of the process's role, shown on every line: supervisor, intake, mirror, or the
# worker's provider and slot. Children set it right after the fork.
_role = "cli"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        # setup_logging turns off the logging module's own getpid() per record.
        record.process = current_pid()
        return True


def set_role(role: str) -> None:
    global _role
    _role = role


def mask_url_passwords(text: str) -> str:
    if "://" not in text:
        return text
    return URL_PASSWORD.sub(r"\1:***@", text)


def parse_key_values(message: str) -> dict[str, str]:
    """Return the `key=value` pairs of a message such as `task ended task_id=t-1 status=failed`.

    A rest-of-line value written as a Python string literal (`error='...'`) is
    returned decoded, without its quotes and escapes.
    """
    pairs: dict[str, str] = {}
    for match in KEY_VALUE.finditer(message):
        key, value = match.groups()
        if key in REST_OF_LINE_KEYS:
            pairs.setdefault(key, _unquoted(message[match.start(2) :].rstrip(";,")))
            break
        # A value may end a tag such as `command_pid=42: started ...`, or a clause.
        pairs.setdefault(key, value.rstrip(";,:"))
    return pairs


def _unquoted(value: str) -> str:
    """Decode `value` when it is a string literal as repr() writes it; return any other value unchanged."""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return value
    try:
        text = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    # Only a literal that repr() writes back the same way: "'a' 'b'" would otherwise become 'ab'.
    return text if isinstance(text, str) and repr(text) == value else value


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(name)s: %(message)s")
        # The date and time to the second of the last line, which the next lines of the same second reuse.
        self.second = -1
        self.second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        """Return the time of a line made at `created` (Unix time), as `%(asctime)s` shows it."""
        second = int(created)
        if second != self.second:
            self.second = second
            self.second_text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
        return f"{self.second_text},{int((created - second) * 1000):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = mask_url_passwords(super().format(record))
        repeated = getattr(record, "repeated", 0)
        return f"{line} (repeated {repeated} times in {record.repeat_seconds:.0f} s)" if repeated else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, role, pid, logger, message and the message's key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = mask_url_passwords(record.getMessage())
        document: dict = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname,
            "role": getattr(record, "role", _role),
            "pid": record.process,
            "logger": record.name,
            "message": message,
        }
        for key, value in parse_key_values(message).items():
            if key not in JSON_BASE_FIELDS:
                document[key] = value
        repeated = getattr(record, "repeated", 0)
        if repeated:
            document["repeated"] = repeated
            document["repeat_seconds"] = round(record.repeat_seconds, 3)
        if record.exc_info:
            document["exception"] = mask_url_passwords(self.formatException(record.exc_info))
        return orjson.dumps(document).decode()


class _Repeats:
    """The suppressed copies of one line within its window."""

    def __init__(self, record: logging.LogRecord, started: float) -> None:
        self.record = record
        self.started = started
        self.count = 0


class ReconnectCounter(logging.Handler):
    """A handler that counts the lines of RECONNECT_MESSAGES in the heartbeat table and writes nothing.

    It is separate from the output handler, so it counts even when `--log-level ERROR` hides the lines.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg if isinstance(record.msg, str) else ""
        for logger_prefix, start, target in RECONNECT_MESSAGES:
            if record.name.startswith(logger_prefix) and message.startswith(start):
                heartbeat.count_reconnect(target)
                return


class TaskvisorHandler(logging.StreamHandler):
    """The stream handler of every process: drops repeats of a warning or error line.

    Repeats are keyed by level, logger and the formatted message, per process: after a
    fork the child starts with no record of its parent's lines.
    """

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 window: float = REPEAT_WINDOW_SECONDS) -> None:  # fmt: skip
        super().__init__(stream)
        self.clock = clock
        self.window = window
        self.repeats: dict[tuple[int, str, str], _Repeats] = {}
        self.pid = current_pid()

    def emit(self, record: logging.LogRecord) -> None:
        # logging.Handler.handle holds self.lock around this call.
        now = self._before_line()
        if record.levelno >= logging.WARNING:
            key = (record.levelno, record.name, record.getMessage())
            seen = self.repeats.get(key)
            if seen is not None:
                seen.count += 1
                seen.record = record
                return
            self.repeats[key] = _Repeats(record, now)
        super().emit(record)

    def write_info(self, logger_name: str, message: str) -> None:
        """Write one INFO line of the text format without making a log record, for `info_line`."""
        formatter = self.formatter
        self.acquire()
        try:
            self._before_line()
            line = f"{formatter.stamp(time.time())} INFO    {_role}[{current_pid()}] {logger_name}: {message}"
            self.stream.write(mask_url_passwords(line) + self.terminator)
            self.flush()
        except Exception:  # noqa: BLE001 - a failed write must not stop the task, as in logging.Handler
            self.handleError(logging.makeLogRecord({"name": logger_name, "msg": message, "levelno": logging.INFO}))
        finally:
            self.release()

    def _before_line(self) -> float:
        """Forget a parent's repeats after a fork, write the summaries that are due, and return the clock's time.

        The caller holds the handler's lock.
        """
        if self.pid != current_pid():
            self.pid = current_pid()
            self.repeats.clear()
        now = self.clock()
        self._flush(now, force=False)
        return now

    def _flush(self, now: float, force: bool) -> None:
        """Write a summary for each window that is over (every window when `force`), and forget it."""
        for key, seen in list(self.repeats.items()):
            if not force and now - seen.started < self.window:
                continue
            del self.repeats[key]
            if seen.count:
                summary = logging.makeLogRecord(seen.record.__dict__)
                summary.repeated = seen.count
                summary.repeat_seconds = now - seen.started
                super().emit(summary)

    def flush_repeats(self) -> None:
        """Write the summaries of all lines repeated so far, for example before the process exits."""
        with self.lock:
            if self.pid == current_pid():
                self._flush(self.clock(), force=True)

    def close(self) -> None:
        # logging.shutdown closes every handler when a process exits.
        self.flush_repeats()
        super().close()


# The output handler and the root logger's handler list that `setup_logging` made, for `info_line`.
_output: TaskvisorHandler | None = None
_root_handlers: list[logging.Handler] = []


def info_line(logger: logging.Logger, message: str) -> None:
    """Log `message` (already formatted) at INFO, the way `logger.info(message)` would.

    A worker logs a line for every task. In a one-off measurement with 16 workers busy
    on 2 cores, writing no line at all saved about a quarter of a worker's CPU per no-op
    task, and writing it this way saves about half of that. With the text format and
    the handlers that `setup_logging` installed, this writes the same line straight to
    the output handler. In any other set-up (the JSON format, or more handlers, as in
    tests that capture records) it calls `logger.info`.
    """
    handler = _output
    if (
        handler is None or logging.getLogger().handlers != _root_handlers or logger.handlers
        or not isinstance(handler.formatter, TextFormatter)
    ):  # fmt: skip
        logger.info("%s", message)
        return
    if not logger.isEnabledFor(logging.INFO) or handler.level > logging.INFO:
        return
    handler.write_info(logger.name, message)


def setup_logging(level: str = "INFO", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send log lines of `level` and above to stderr (or `stream`) as plain text or JSON."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = TaskvisorHandler(stream or sys.stderr)
    handler.setLevel(level.upper())
    handler.addFilter(_RoleFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, TaskvisorHandler):
            old.flush_repeats()
    root.handlers[:] = [handler, ReconnectCounter()]
    global _output, _root_handlers
    _output, _root_handlers = handler, list(root.handlers)
    # The formats name no source file, line, thread or multiprocessing process, so the
    # records need not look them up: the logging module's documented switches for that
    # (see "Optimization" in the Python logging HOWTO). The process id comes from
    # _RoleFilter instead of a getpid() per record. A worker logs a line or more per task.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    # The root level lets warnings through to ReconnectCounter; `handler` applies `level`.
    root.setLevel(min(logging.getLevelName(level.upper()), logging.WARNING))
