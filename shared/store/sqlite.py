"""The SQLite backend of the store, for a single host.

The database runs in WAL mode, so the CLI can read while the supervisor writes. With
synchronous=NORMAL the file stays consistent, but a power loss may undo the last committed
batches.
"""

import logging
import os
import sqlite3
import time
from typing import Any

from shared.errors import StoreError
from shared.store.base import (
    INSTANCE_COLUMNS,
    MISSING_SCHEMA_HINT,
    TASK_COLUMNS,
    TASK_FIXED_COLUMNS,
    Store,
    batch_parameters,
    format_time,
)
from shared.store.records import InstanceRecord, TaskRecord

logger = logging.getLogger(__name__)

# How long a statement waits for another connection's write lock before it fails with
# "database is locked".
BUSY_TIMEOUT_MS = 5000

# Times are text 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC (see shared.store.base).
# Every index ends in id, so the keyset order (created_at, id) is served by the index alone.
_SCHEMA_STEPS: dict[int, list[str]] = {
    1: [
        """
        CREATE TABLE IF NOT EXISTS taskvisor_tasks (
            id TEXT NOT NULL PRIMARY KEY,
            provider_id TEXT NOT NULL,
            instance_id TEXT,
            user_id TEXT NOT NULL,
            task_type TEXT NOT NULL,
            status TEXT NOT NULL,
            progress REAL NOT NULL,
            status_message TEXT NOT NULL,
            error_message TEXT NOT NULL,
            task_data TEXT NOT NULL,
            result TEXT,
            timeout_seconds REAL NOT NULL,
            attempts INTEGER NOT NULL,
            version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            started_at TEXT,
            completed_at TEXT,
            updated_at TEXT NOT NULL
        )
        """,
        "CREATE INDEX IF NOT EXISTS taskvisor_tasks_status ON taskvisor_tasks (status, created_at, id)",
        "CREATE INDEX IF NOT EXISTS taskvisor_tasks_provider ON taskvisor_tasks (provider_id, created_at, id)",
        "CREATE INDEX IF NOT EXISTS taskvisor_tasks_user ON taskvisor_tasks (user_id, created_at, id)",
        "CREATE INDEX IF NOT EXISTS taskvisor_tasks_instance ON taskvisor_tasks (instance_id, created_at, id)",
        "CREATE INDEX IF NOT EXISTS taskvisor_tasks_created ON taskvisor_tasks (created_at, id)",
        """
        CREATE TABLE IF NOT EXISTS taskvisor_instances (
            id TEXT NOT NULL,
            provider_id TEXT NOT NULL,
            status TEXT NOT NULL,
            last_task_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (provider_id, id)
        ) WITHOUT ROWID
        """,
    ],
}

_CREATE_SCHEMA_TABLE = """
    CREATE TABLE IF NOT EXISTS taskvisor_schema (
        version INTEGER NOT NULL PRIMARY KEY,
        applied_at TEXT NOT NULL
    )
"""


def _upsert_sql(table: str, columns: tuple[str, ...], key: str, fixed: tuple[str, ...] = ()) -> str:
    """Build a versioned upsert: the row is updated only when the incoming version is greater.

    The `fixed` columns are written only when the row is inserted.
    """
    assignments = ", ".join(
        f"{column} = excluded.{column}" for column in columns if column not in key and column not in fixed
    )
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
        f" ON CONFLICT ({key}) DO UPDATE SET {assignments}"
        f" WHERE excluded.version > {table}.version"
    )


_TASK_UPSERT = _upsert_sql("taskvisor_tasks", TASK_COLUMNS, "id", TASK_FIXED_COLUMNS)
_INSTANCE_UPSERT = _upsert_sql("taskvisor_instances", INSTANCE_COLUMNS, "provider_id, id")


class SqliteStore(Store):
    """The store in one SQLite file."""

    placeholder = "?"

    def __init__(self, path: str, display_url: str) -> None:
        super().__init__(display_url)
        self.path = path
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise StoreError(
                f"cannot open SQLite database {path} (from {display_url}): directory {directory} does not exist"
            )

        try:
            # Autocommit mode: write_batch opens its own transactions with BEGIN IMMEDIATE.
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path} (from {display_url}): {exc}") from exc

        connection.row_factory = sqlite3.Row
        # Switching to WAL fails at once, without waiting, while another process creates
        # the same file (two processes starting together), so it is tried again.
        give_up_at = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                journal_mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                connection.execute("PRAGMA synchronous=NORMAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= give_up_at:
                    connection.close()
                    raise StoreError(f"cannot configure SQLite database {path}: {exc}") from exc
                time.sleep(0.05)
            except sqlite3.Error as exc:
                connection.close()
                raise StoreError(f"cannot configure SQLite database {path}: {exc}") from exc

        if journal_mode.lower() != "wal":
            logger.warning(
                "SQLite database %s uses journal mode %s because WAL is unavailable: readers may block writes",
                path,
                journal_mode,
            )
        self._connection: sqlite3.Connection | None = connection
        logger.info("Opened SQLite store %s", path)

    def init_schema(self) -> None:
        with self._lock:
            connection = self._current_connection()
            try:
                # One transaction for the whole upgrade: SQLite DDL is transactional, and the
                # write lock keeps a second process from applying the same steps meanwhile.
                connection.execute("BEGIN IMMEDIATE")
                connection.execute(_CREATE_SCHEMA_TABLE)
                stored_version = connection.execute("SELECT MAX(version) FROM taskvisor_schema").fetchone()[0] or 0
                applied = list(self._versions_to_apply(stored_version))
                for version in applied:
                    for statement in _SCHEMA_STEPS[version]:
                        connection.execute(statement)
                    connection.execute(
                        "INSERT INTO taskvisor_schema (version, applied_at) VALUES (?, ?)",
                        (version, format_time(time.time())),
                    )
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"creating the schema in SQLite database {self.path} failed: {exc}") from exc
            finally:
                self._rollback(connection)

        for version in applied:
            logger.info("Applied schema version %d to SQLite database %s", version, self.path)

    def write_batch(self, tasks: list[TaskRecord], instances: list[InstanceRecord]) -> None:
        if not tasks and not instances:
            return
        task_rows, instance_rows = batch_parameters(tasks, instances)

        with self._lock:
            connection = self._current_connection()
            try:
                # IMMEDIATE takes the write lock at BEGIN, so any wait for another writer
                # happens there, under the busy timeout, and never halfway through the batch.
                connection.execute("BEGIN IMMEDIATE")
                if task_rows:
                    connection.executemany(_TASK_UPSERT, task_rows)
                if instance_rows:
                    connection.executemany(_INSTANCE_UPSERT, instance_rows)
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(
                    f"writing {len(task_rows)} tasks and {len(instance_rows)} instances"
                    f" to SQLite database {self.path} failed: {exc}"
                ) from exc
            finally:
                self._rollback(connection)

    def close(self) -> None:
        with self._lock:
            if self._connection is None:
                return
            self._connection.close()
            self._connection = None
            logger.info("Closed SQLite store %s", self.path)

    def _select(self, sql: str, parameters: tuple | list) -> list[dict[str, Any]]:
        with self._lock:
            connection = self._current_connection()
            try:
                rows = connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                hint = MISSING_SCHEMA_HINT if "no such table" in str(exc) else ""
                raise StoreError(f"reading SQLite database {self.path} failed: {exc}{hint}") from exc
        return [dict(row) for row in rows]

    def _execute(self, sql: str, parameters: tuple | list) -> int:
        with self._lock:
            connection = self._current_connection()
            try:
                # Autocommit mode: the statement is its own transaction.
                return connection.execute(sql, parameters).rowcount
            except sqlite3.Error as exc:
                hint = MISSING_SCHEMA_HINT if "no such table" in str(exc) else ""
                raise StoreError(f"writing to SQLite database {self.path} failed: {exc}{hint}") from exc

    def _current_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreError(f"the store for {self.display_url} is closed")
        return self._connection

    def _rollback(self, connection: sqlite3.Connection) -> None:
        """Roll back the open transaction, if any: after a COMMIT there is none."""
        if not connection.in_transaction:
            return
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.warning("Rolling back on SQLite database %s failed: %s", self.path, exc)

