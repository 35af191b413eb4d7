"""The `Store` interface and the parts both SQL backends share.

Times cross the interface as UTC seconds since the epoch (floats). In the database they are
stored with microsecond precision: DATETIME(6) on MySQL, and on SQLite text in the form
'YYYY-MM-DD HH:MM:SS.ffffff', which sorts in time order. Both backends use the same text form
as query parameters, because MySQL accepts it for DATETIME columns.
"""

import base64
import binascii
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from datetime import datetime, timedelta
from typing import Any, Self

from shared.errors import StoreError
from shared.states import TERMINAL_STATUSES, TaskStatus
from shared.store.records import InstanceRecord, TaskRecord

logger = logging.getLogger(__name__)

MISSING_SCHEMA_HINT = (
    "; the taskvisor tables do not exist yet: run `taskvisor db init` (or start the supervisor, which creates them)"
)

# Bump this and add the upgrade steps to both backends when the schema changes.
SCHEMA_VERSION = 1

TASK_COLUMNS = (
    "id",
    "provider_id",
    "instance_id",
    "user_id",
    "task_type",
    "status",
    "progress",
    "status_message",
    "error_message",
    "task_data",
    "result",
    "timeout_seconds",
    "attempts",
    "version",
    "created_at",
    "started_at",
    "completed_at",
    "updated_at",
)
TASK_TIME_COLUMNS = ("created_at", "started_at", "completed_at", "updated_at")
# Columns that keep the value a task was registered with. Every event of a task carries
# the same values, so the upserts write them only with a new row. An SQLite update that
# leaves them also leaves the three indexes that contain only fixed columns.
TASK_FIXED_COLUMNS = ("provider_id", "user_id", "task_type", "task_data", "timeout_seconds", "created_at")

INSTANCE_COLUMNS = ("id", "provider_id", "status", "last_task_id", "version", "updated_at")
INSTANCE_TIME_COLUMNS = ("updated_at",)

DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500

_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def epoch_to_micros(seconds: float) -> int:
    """Round UTC epoch seconds to whole microseconds, the precision of the time columns."""
    if not math.isfinite(seconds):
        raise ValueError(f"time {seconds!r} is not a finite number of seconds")
    return round(seconds * 1_000_000)


# The last second that format_micros formatted, with its text. The times of one batch
# mostly fall in a few seconds. One tuple, so that a thread always reads a matching pair.
_last_second: tuple[int, str] = (-1, "")
# The last second of year 9999. format_micros formats the seconds from 0 to this one with `time`.
_LAST_FAST_SECOND = 253402300799


def format_micros(micros: int) -> str:
    """Format UTC epoch microseconds as 'YYYY-MM-DD HH:MM:SS.ffffff'."""
    global _last_second
    seconds, fraction = divmod(micros, 1_000_000)
    if not 0 <= seconds <= _LAST_FAST_SECOND:
        # datetime raises OverflowError outside years 1-9999, which batch_parameters reports.
        return (_EPOCH + micros * _MICROSECOND).isoformat(" ", "microseconds")
    cached_second, text = _last_second
    if cached_second != seconds:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{fraction:06d}"


def format_time(seconds: float | None) -> str | None:
    """Convert UTC epoch seconds to the text form of the time columns, or None to None."""
    if seconds is None:
        return None
    return format_micros(epoch_to_micros(seconds))


def parse_time(value: datetime | str | None) -> float | None:
    """Convert a time column value (a naive UTC datetime or its text form) to epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return ((value - _EPOCH) // _MICROSECOND) / 1_000_000


def clamp_progress(progress: float) -> float:
    """Clamp a progress percentage to 0-100, turning NaN into 0."""
    if math.isnan(progress):
        return 0.0
    return min(max(float(progress), 0.0), 100.0)


def task_parameters(task: TaskRecord) -> tuple:
    """Return the values of one task row in `TASK_COLUMNS` order."""
    return (
        task.id,
        task.provider_id,
        task.instance_id,
        task.user_id,
        task.task_type,
        task.status,
        clamp_progress(task.progress),
        task.status_message,
        task.error_message,
        task.task_data,
        task.result,
        task.timeout_seconds,
        task.attempts,
        task.version,
        format_time(task.created_at),
        format_time(task.started_at),
        format_time(task.completed_at),
        format_time(task.updated_at),
    )


def instance_parameters(instance: InstanceRecord) -> tuple:
    """Return the values of one instance row in `INSTANCE_COLUMNS` order."""
    return (
        instance.id,
        instance.provider_id,
        instance.status,
        instance.last_task_id,
        instance.version,
        format_time(instance.updated_at),
    )


def batch_parameters(tasks: list[TaskRecord], instances: list[InstanceRecord]) -> tuple[list[tuple], list[tuple]]:
    """Convert a batch to row tuples, raising StoreError that names the first invalid record."""
    task_rows = []
    for task in tasks:
        try:
            task_rows.append(task_parameters(task))
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(f"task {task.id!r} has an invalid value and the batch was not written: {exc}") from exc

    instance_rows = []
    for instance in instances:
        try:
            instance_rows.append(instance_parameters(instance))
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"instance {instance.provider_id!r}/{instance.id!r} has an invalid value"
                f" and the batch was not written: {exc}"
            ) from exc
    return task_rows, instance_rows


def time_parameter(name: str, seconds: float) -> str:
    """Convert a time argument to the text form of the time columns, raising StoreError that names it."""
    try:
        return format_micros(epoch_to_micros(seconds))
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError(f"invalid {name} {seconds!r}: expected UTC epoch seconds ({exc})") from None


def encode_cursor(created_at: float, task_id: str) -> str:
    """Encode the keyset position (created_at, id) as a URL-safe string."""
    payload = f"{epoch_to_micros(created_at)}|{task_id}".encode("utf-8")
    return base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Decode a cursor into (created_at in epoch microseconds, task id)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
        micros_text, task_id = payload.split("|", 1)
        return int(micros_text), task_id
    except (binascii.Error, UnicodeError, ValueError):
        raise StoreError(
            f"invalid cursor {cursor!r}: pass the cursor printed at the end of the previous page"
        ) from None


class Store(ABC):
    """A connection to the SQL mirror of task and instance state.

    One instance may be shared between threads: a lock serialises calls on its single
    connection. Call `init_schema()` once before the first write.
    """

    # The driver's query parameter marker.
    placeholder = "?"

    def __init__(self, display_url: str) -> None:
        # The URL with any password replaced by ***, for messages and logs.
        self.display_url = display_url
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    @abstractmethod
    def init_schema(self) -> None:
        """Create the tables or upgrade them to `SCHEMA_VERSION`. Running it again changes nothing."""

    @abstractmethod
    def write_batch(self, tasks: list[TaskRecord], instances: list[InstanceRecord]) -> None:
        """Upsert tasks and instances in one transaction.

        A row is inserted, or updated only when the record's `version` is greater than the
        stored one, so replayed records never move a row back. Raises StoreError. A batch
        that raised may still have been committed, because a connection can drop during
        COMMIT. The caller then writes the whole batch again, which the version check makes safe.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the connection. Calling it again does nothing."""

    @abstractmethod
    def _select(self, sql: str, parameters: tuple | list) -> list[dict[str, Any]]:
        """Run one SELECT and return its rows as dicts keyed by column name."""

    @abstractmethod
    def _execute(self, sql: str, parameters: tuple | list) -> int:
        """Run one data-changing statement in its own transaction and return the rows it changed."""

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        """Return the task row with every column, times as epoch seconds, or None if it is missing."""
        sql = f"SELECT {', '.join(TASK_COLUMNS)} FROM taskvisor_tasks WHERE id = {self.placeholder}"
        rows = self._select(sql, (task_id,))
        if not rows:
            return None
        return _convert_times(rows[0], TASK_TIME_COLUMNS)

    def list_tasks(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        user: str | None = None,
        instance: str | None = None,
        task_type: str | None = None,
        created_from: float | None = None,
        created_until: float | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        before: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return task rows that match every given filter, newest first.

        `created_from` (inclusive) and `created_until` (exclusive) bound created_at, in UTC
        epoch seconds. `limit` is clamped to 1-500. To get the next page, pass
        `cursor_for(last_row)` as `before`. Pages are cut on (created_at, id), so rows written
        meanwhile never make another row repeat or go missing.
        """
        marker = self.placeholder
        filters = (
            ("status", status),
            ("provider_id", provider),
            ("user_id", user),
            ("instance_id", instance),
            ("task_type", task_type),
        )
        conditions = []
        parameters: list[Any] = []
        for column, value in filters:
            if value is not None:
                conditions.append(f"{column} = {marker}")
                parameters.append(value)

        if created_from is not None:
            conditions.append(f"created_at >= {marker}")
            parameters.append(time_parameter("created_from", created_from))
        if created_until is not None:
            conditions.append(f"created_at < {marker}")
            parameters.append(time_parameter("created_until", created_until))

        if before is not None:
            created_micros, task_id = decode_cursor(before)
            created_at = format_micros(created_micros)
            conditions.append(f"(created_at < {marker} OR (created_at = {marker} AND id < {marker}))")
            parameters.extend((created_at, created_at, task_id))

        where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        sql = (
            f"SELECT {', '.join(TASK_COLUMNS)} FROM taskvisor_tasks {where}"
            f"ORDER BY created_at DESC, id DESC LIMIT {marker}"
        )
        parameters.append(min(max(int(limit), 1), MAX_LIST_LIMIT))
        rows = self._select(sql, parameters)
        return [_convert_times(row, TASK_TIME_COLUMNS) for row in rows]

    @staticmethod
    def cursor_for(row: dict[str, Any]) -> str:
        """Return the `before` cursor that continues a listing after `row`."""
        return encode_cursor(row["created_at"], row["id"])

    def get_instance(self, provider: str, instance_id: str) -> dict[str, Any] | None:
        """Return the instance row, its time as epoch seconds, or None if it is missing."""
        marker = self.placeholder
        sql = (
            f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM taskvisor_instances"
            f" WHERE provider_id = {marker} AND id = {marker}"
        )
        rows = self._select(sql, (provider, instance_id))
        if not rows:
            return None
        return _convert_times(rows[0], INSTANCE_TIME_COLUMNS)

    def count_by_status(self) -> dict[str, int]:
        """Return the number of tasks in each status; statuses with no tasks are absent."""
        rows = self._select("SELECT status, COUNT(*) AS task_count FROM taskvisor_tasks GROUP BY status", ())
        return {row["status"]: int(row["task_count"]) for row in rows}

    def count_by_provider_status(self) -> dict[str, dict[str, int]]:
        """Return the number of tasks per provider and status; empty combinations are absent."""
        rows = self._select(
            "SELECT provider_id, status, COUNT(*) AS task_count FROM taskvisor_tasks GROUP BY provider_id, status", ()
        )
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["provider_id"], {})[row["status"]] = int(row["task_count"])
        return counts

    def run_durations(self, since: float, limit: int = 10000) -> dict[str, list[float]]:
        """Return the run times in seconds of completed tasks per task type, newest first.

        A run time is completed_at - started_at of a task in status `completed` whose
        completed_at is at or after `since`. At most `limit` tasks are read in all, the most
        recently completed ones. The difference is computed here rather than in SQL, because
        SQLite and MySQL have no common function for subtracting two times.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        marker = self.placeholder
        # NOTE: no index starts with completed_at, so this scans every completed task.
        sql = (
            "SELECT task_type, started_at, completed_at FROM taskvisor_tasks"
            f" WHERE status = {marker} AND completed_at >= {marker} AND started_at IS NOT NULL"
            f" ORDER BY completed_at DESC, id DESC LIMIT {marker}"
        )
        rows = self._select(sql, (TaskStatus.COMPLETED.value, time_parameter("since", since), int(limit)))

        durations: dict[str, list[float]] = {}
        for row in rows:
            seconds = parse_time(row["completed_at"]) - parse_time(row["started_at"])
            durations.setdefault(row["task_type"], []).append(seconds)
        return durations

    def error_rate(self, since: float) -> tuple[int, int, int]:
        """Return (errors, terminal, rejected) task counts for tasks completed at or after `since`.

        `rejected` counts the tasks of entries rejected as invalid (`failed` with an error
        starting `rejected: `), which no driver ran. `terminal` counts the other tasks in
        every terminal status, cancelled included, and `errors` the other `failed` and
        `timeout` ones, so neither a cancelled task nor a producer's invalid entry is an error.
        """
        marker = self.placeholder
        terminal = sorted(status.value for status in TERMINAL_STATUSES)
        sql = (
            f"SELECT CASE WHEN status = {marker} AND error_message LIKE {marker} THEN {marker} ELSE status END"
            " AS outcome, COUNT(*) AS task_count FROM taskvisor_tasks"
            f" WHERE completed_at >= {marker} AND status IN ({', '.join(marker for _ in terminal)})"
            " GROUP BY outcome"
        )
        parameters = (TaskStatus.FAILED.value, "rejected: %", "rejected", time_parameter("since", since), *terminal)
        rows = self._select(sql, parameters)

        counts = {row["outcome"]: int(row["task_count"]) for row in rows}
        rejected = counts.pop("rejected", 0)
        errors = counts.get(TaskStatus.FAILED.value, 0) + counts.get(TaskStatus.TIMEOUT.value, 0)
        return errors, sum(counts.values()), rejected

    def _finished_before(self, before: float) -> tuple[str, list[Any]]:
        """Return the WHERE condition and parameters that select tasks that ended before `before`.

        created_at < before is implied by the end time, because a task ends after it is
        created, and lets the (status, created_at, id) index narrow the scan.
        """
        marker = self.placeholder
        final = sorted(status.value for status in TERMINAL_STATUSES)
        cutoff = time_parameter("before", before)
        condition = (
            f"status IN ({', '.join(marker for _ in final)}) AND created_at < {marker}"
            f" AND COALESCE(completed_at, updated_at) < {marker}"
        )
        return condition, [*final, cutoff, cutoff]

    def count_finished_before(self, before: float) -> int:
        """Return the number of tasks in a final status whose completed_at is before `before` (epoch seconds)."""
        condition, parameters = self._finished_before(before)
        rows = self._select(f"SELECT COUNT(*) AS task_count FROM taskvisor_tasks WHERE {condition}", parameters)
        return int(rows[0]["task_count"])

    def delete_finished_before(self, before: float, limit: int) -> int:
        """Delete up to `limit` tasks in a final status that ended before `before`; returns how many.

        The ids are selected first and the delete checks the condition again, so a row
        that the mirror moved out of its final status meanwhile (a `taskvisor retry`) stays.
        Instance rows are kept: they hold the instances' current status.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        condition, parameters = self._finished_before(before)
        select = f"SELECT id FROM taskvisor_tasks WHERE {condition} LIMIT {self.placeholder}"
        rows = self._select(select, [*parameters, int(limit)])
        if not rows:
            return 0
        ids = [row["id"] for row in rows]
        marker = self.placeholder
        sql = f"DELETE FROM taskvisor_tasks WHERE id IN ({', '.join(marker for _ in ids)}) AND {condition}"
        return self._execute(sql, [*ids, *parameters])

    def _versions_to_apply(self, stored_version: int) -> range:
        """Return the schema versions to apply after `stored_version` (0 for an empty database)."""
        if stored_version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.display_url} has schema version {stored_version}, but this taskvisor"
                f" supports at most version {SCHEMA_VERSION}: upgrade taskvisor or use another database"
            )
        return range(stored_version + 1, SCHEMA_VERSION + 1)

def _convert_times(row: dict[str, Any], time_columns: tuple[str, ...]) -> dict[str, Any]:
    for column in time_columns:
        row[column] = parse_time(row[column])
    return row
