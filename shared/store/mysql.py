"""The MySQL and MariaDB backend of the store, through PyMySQL.

Tables use InnoDB and utf8mb4 with the binary collation, so ids compare and sort by code
point as they do on SQLite. Under a case-insensitive collation, 'Task-1' and 'task-1' would
be the same primary key.
"""

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pymysql
from pymysql.connections import Connection
from pymysql.constants import CR, ER
from pymysql.cursors import DictCursor

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

Result = TypeVar("Result")

CONNECT_TIMEOUT_SECONDS = 10
# Read and write timeout of the connection, also while waiting for the server's greeting.
# Without it, a server that accepts the connection but never replies blocks a call forever.
# It is longer than InnoDB's default lock wait timeout (innodb_lock_wait_timeout = 50 s), so
# a blocked write ends with error 1205 and is retried instead of ending as a lost connection.
# NOTE: a future schema step that rebuilds a large table may need longer than this.
IO_TIMEOUT_SECONDS = 60
# How long init_schema waits for another process that is upgrading the same database. It is
# shorter than IO_TIMEOUT_SECONDS, so GET_LOCK returns before the read timeout ends the wait.
SCHEMA_LOCK_SECONDS = 30

# After a deadlock or lock wait timeout the store rolls back and retries the whole transaction,
# which is safe because the upserts are versioned.
LOCK_ERROR_CODES = frozenset({ER.LOCK_DEADLOCK, ER.LOCK_WAIT_TIMEOUT})
MAX_LOCK_RETRIES = 3
LOCK_RETRY_DELAY_SECONDS = 0.1
# MySQL 8.0.24 and later send this error, instead of only closing the socket, before they
# close a connection that was idle for longer than wait_timeout. PyMySQL has no name for it.
ER_CLIENT_INTERACTION_TIMEOUT = 4031
# Errors after which the connection is gone: "server has gone away", "lost connection", a
# server that is shutting down, and the idle timeout above. The store reconnects once and
# retries. MariaDB 10.11 closes the socket on KILL CONNECTION, on shutdown and at its idle
# timeout, which PyMySQL reports as CR_SERVER_LOST or CR_SERVER_GONE_ERROR.
CONNECTION_ERROR_CODES = frozenset(
    {CR.CR_SERVER_GONE_ERROR, CR.CR_SERVER_LOST, ER.SERVER_SHUTDOWN, ER_CLIENT_INTERACTION_TIMEOUT}
)
# Errors whose message gets the hint to check the server address and the user's rights:
# no server reached, connection lost, access denied, or a host the server rejects.
UNREACHABLE_ERROR_CODES = CONNECTION_ERROR_CODES | {
    CR.CR_CONN_HOST_ERROR,
    CR.CR_UNKNOWN_HOST,
    ER.ACCESS_DENIED_ERROR,
    ER.DBACCESS_DENIED_ERROR,
    ER.HOST_NOT_PRIVILEGED,
}

_TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC"

# Ids are VARCHAR(191) because 191 four-byte characters fit the 767-byte index key limit of
# older InnoDB row formats. Indexes live in CREATE TABLE because MySQL, unlike MariaDB, has
# no CREATE INDEX IF NOT EXISTS. InnoDB appends the primary key (id) to every secondary
# index, which serves the keyset order (created_at, id).
_SCHEMA_STEPS: dict[int, list[str]] = {
    1: [
        f"""
        CREATE TABLE IF NOT EXISTS taskvisor_tasks (
            id VARCHAR(191) NOT NULL,
            provider_id VARCHAR(191) NOT NULL,
            instance_id VARCHAR(191) NULL,
            user_id VARCHAR(191) NOT NULL,
            task_type VARCHAR(64) NOT NULL,
            status VARCHAR(32) NOT NULL,
            progress DOUBLE NOT NULL,
            status_message TEXT NOT NULL,
            error_message TEXT NOT NULL,
            task_data MEDIUMTEXT NOT NULL,
            result MEDIUMTEXT NULL,
            timeout_seconds DOUBLE NOT NULL,
            attempts INT NOT NULL,
            version BIGINT NOT NULL,
            created_at DATETIME(6) NOT NULL,
            started_at DATETIME(6) NULL,
            completed_at DATETIME(6) NULL,
            updated_at DATETIME(6) NOT NULL,
            PRIMARY KEY (id),
            KEY taskvisor_tasks_status (status, created_at),
            KEY taskvisor_tasks_provider (provider_id, created_at),
            KEY taskvisor_tasks_user (user_id, created_at),
            KEY taskvisor_tasks_instance (instance_id, created_at),
            KEY taskvisor_tasks_created (created_at)
        ) {_TABLE_OPTIONS}
        """,
        f"""
        CREATE TABLE IF NOT EXISTS taskvisor_instances (
            id VARCHAR(191) NOT NULL,
            provider_id VARCHAR(191) NOT NULL,
            status VARCHAR(32) NOT NULL,
            last_task_id VARCHAR(191) NOT NULL,
            version BIGINT NOT NULL,
            updated_at DATETIME(6) NOT NULL,
            PRIMARY KEY (provider_id, id)
        ) {_TABLE_OPTIONS}
        """,
    ],
}

_CREATE_SCHEMA_TABLE = f"""
    CREATE TABLE IF NOT EXISTS taskvisor_schema (
        version INT NOT NULL,
        applied_at DATETIME(6) NOT NULL,
        PRIMARY KEY (version)
    ) {_TABLE_OPTIONS}
"""


def _upsert_sql(table: str, columns: tuple[str, ...], key_columns: tuple[str, ...], fixed: tuple[str, ...] = ()) -> str:
    """Build a versioned upsert: each column takes the incoming value only when its version is greater.

    The `fixed` columns are written only when the row is inserted.

    `version` is assigned last because MySQL evaluates the assignments left to right, and
    every IF before it must still compare against the stored version.
    NOTE: MySQL 8.0.20 deprecates VALUES() here in favour of a row alias, which MariaDB lacks.
    """
    newer = "VALUES(version) > version"
    assignments = [
        f"{column} = IF({newer}, VALUES({column}), {column})"
        for column in columns
        if column not in key_columns and column not in fixed and column != "version"
    ]
    assignments.append(f"version = IF({newer}, VALUES(version), version)")
    # PyMySQL's executemany turns this form into multi-row INSERTs, which is what makes batches fast.
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('%s' for _ in columns)})"
        f" ON DUPLICATE KEY UPDATE {', '.join(assignments)}"
    )


_TASK_UPSERT = _upsert_sql("taskvisor_tasks", TASK_COLUMNS, ("id",), TASK_FIXED_COLUMNS)
_INSTANCE_UPSERT = _upsert_sql("taskvisor_instances", INSTANCE_COLUMNS, ("provider_id", "id"))


class MysqlStore(Store):
    """The store in a MySQL or MariaDB database."""

    placeholder = "%s"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str | None,
        database: str,
        display_url: str,
        io_timeout_seconds: float = IO_TIMEOUT_SECONDS,
    ) -> None:
        """Connect at once, raising StoreError. `io_timeout_seconds` is the read and write timeout."""
        super().__init__(display_url)
        self._io_timeout_seconds = io_timeout_seconds
        self._server = f"{host}:{port}"
        self._user = user
        self._connect_arguments: dict[str, Any] = {
            "host": host,
            "port": port,
            "user": user,
            "password": password or "",
            "database": database,
            "charset": "utf8mb4",
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "read_timeout": io_timeout_seconds,
            "write_timeout": io_timeout_seconds,
        }
        self._connection: Connection | None = self._connect()
        self._closed = False
        logger.info("Opened MySQL store %s", display_url)

    def init_schema(self) -> None:
        applied: list[int] = []

        def create(connection: Connection) -> None:
            applied.clear()
            with connection.cursor() as cursor:
                # A named lock keeps two processes from upgrading the same database at once.
                cursor.execute("SELECT GET_LOCK(CONCAT('taskvisor_schema.', DATABASE()), %s)", (SCHEMA_LOCK_SECONDS,))
                if cursor.fetchone()[0] != 1:
                    raise StoreError(
                        f"timed out after {SCHEMA_LOCK_SECONDS} s waiting for another process to finish"
                        f" the schema upgrade of {self.display_url}"
                    )
                try:
                    cursor.execute(_CREATE_SCHEMA_TABLE)
                    cursor.execute("SELECT MAX(version) FROM taskvisor_schema")
                    stored_version = cursor.fetchone()[0] or 0
                    for version in self._versions_to_apply(stored_version):
                        # MySQL commits each DDL statement at once, so every statement must be
                        # safe to repeat after a step that failed halfway.
                        for statement in _SCHEMA_STEPS[version]:
                            cursor.execute(statement)
                        cursor.execute(
                            "INSERT INTO taskvisor_schema (version, applied_at) VALUES (%s, %s)",
                            (version, format_time(time.time())),
                        )
                        applied.append(version)
                finally:
                    cursor.execute("SELECT RELEASE_LOCK(CONCAT('taskvisor_schema.', DATABASE()))")

        with self._lock:
            self._run("creating the schema", create)
        for version in applied:
            logger.info("Applied schema version %d to %s", version, self.display_url)

    def write_batch(self, tasks: list[TaskRecord], instances: list[InstanceRecord]) -> None:
        if not tasks and not instances:
            return
        task_rows, instance_rows = batch_parameters(tasks, instances)

        def write(connection: Connection) -> None:
            connection.begin()
            with connection.cursor() as cursor:
                if task_rows:
                    cursor.executemany(_TASK_UPSERT, task_rows)
                if instance_rows:
                    cursor.executemany(_INSTANCE_UPSERT, instance_rows)
            connection.commit()

        with self._lock:
            self._run(f"writing {len(task_rows)} tasks and {len(instance_rows)} instances", write)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_connection()
            logger.info("Closed MySQL store %s", self.display_url)

    def _select(self, sql: str, parameters: tuple | list) -> list[dict[str, Any]]:
        def select(connection: Connection) -> list[dict[str, Any]]:
            with connection.cursor(DictCursor) as cursor:
                cursor.execute(sql, parameters)
                return list(cursor.fetchall())

        with self._lock:
            return self._run("reading", select)

    def _execute(self, sql: str, parameters: tuple | list) -> int:
        def execute(connection: Connection) -> int:
            # The connection is in autocommit mode, so the statement is its own transaction.
            with connection.cursor() as cursor:
                return cursor.execute(sql, parameters)

        with self._lock:
            return self._run("writing", execute)

    def _connect(self) -> Connection:
        try:
            return pymysql.connect(**self._connect_arguments)
        except pymysql.MySQLError as exc:
            raise StoreError(f"cannot connect to {self.display_url}: {self._describe(exc)}") from exc
        except RuntimeError as exc:
            # PyMySQL raises RuntimeError when a login method needs a package it lacks,
            # such as cryptography for caching_sha2_password.
            raise StoreError(
                f"cannot connect to {self.display_url}: {exc}; reinstall taskvisor so that PyMySQL's rsa extra "
                f"(cryptography) is installed"
            ) from exc

    def _describe(self, exc: pymysql.MySQLError) -> str:
        """Describe a driver error and, when the server was not reachable, what to check."""
        code = exc.args[0] if exc.args else None
        if _timed_out(exc):
            text = exc.args[1] if len(exc.args) > 1 else exc
            detail = f"no reply from the server within {self._io_timeout_seconds:g} s (error {code}: {text})"
        else:
            detail = str(exc)

        if code == ER.BAD_DB_ERROR:
            return f"{detail}; create the database first or fix its name in the URL"
        if code in UNREACHABLE_ERROR_CODES or isinstance(exc, pymysql.InterfaceError):
            return (
                f"{detail}; check that a MySQL or MariaDB server is listening on {self._server}"
                f" and that user {self._user!r} may connect to it from this host"
            )
        return detail

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or not connection.open:
            return
        try:
            connection.close()
        except pymysql.MySQLError as exc:
            logger.debug("Closing the connection to %s failed: %s", self.display_url, exc)

    def _run(self, description: str, action: Callable[[Connection], Result]) -> Result:
        """Run `action` on the connection and return its result. The caller holds the lock.

        A deadlock or lock wait timeout is retried up to MAX_LOCK_RETRIES times. A dropped
        connection is reopened and the action retried once. Every other error, and an error
        that outlasts its retries, raises StoreError.
        """
        if self._closed:
            raise StoreError(f"the store for {self.display_url} is closed")
        lock_retries = 0
        reconnected = False
        while True:
            if self._connection is None:
                self._connection = self._connect()
            connection = self._connection
            try:
                return action(connection)
            except pymysql.MySQLError as exc:
                code = exc.args[0] if exc.args else None
                dropped = code in CONNECTION_ERROR_CODES or isinstance(exc, pymysql.InterfaceError)
                if not dropped:
                    # The server rolls back by itself when a connection ends.
                    self._rollback(connection)

                if code in LOCK_ERROR_CODES and lock_retries < MAX_LOCK_RETRIES:
                    lock_retries += 1
                    logger.warning(
                        "%s on %s failed with error %s (%s), retry %d of %d",
                        description,
                        self.display_url,
                        code,
                        exc.args[1] if len(exc.args) > 1 else "",
                        lock_retries,
                        MAX_LOCK_RETRIES,
                    )
                    time.sleep(LOCK_RETRY_DELAY_SECONDS * lock_retries)
                    continue

                if dropped and not reconnected:
                    reconnected = True
                    logger.warning(
                        "%s on %s lost the connection (%s), reconnecting and retrying once",
                        description,
                        self.display_url,
                        exc,
                    )
                    self._drop_connection()
                    continue

                if dropped:
                    # The next call then opens a new connection instead of failing on this one.
                    self._drop_connection()
                hint = MISSING_SCHEMA_HINT if code == ER.NO_SUCH_TABLE else ""
                raise StoreError(f"{description} on {self.display_url} failed: {self._describe(exc)}{hint}") from exc

    def _rollback(self, connection: Connection) -> None:
        if not connection.open:
            return
        try:
            connection.rollback()
        except pymysql.MySQLError as exc:
            logger.debug("Rolling back on %s failed: %s", self.display_url, exc)


def _timed_out(exc: BaseException) -> bool:
    """Return whether a driver error comes from a socket timeout.

    PyMySQL raises its OperationalError inside the handler of the socket's TimeoutError,
    so the timeout is the error's context, or its `original_exception` for a connect.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TimeoutError):
            return True
        seen.add(id(current))
        current = getattr(current, "original_exception", None) or current.__cause__ or current.__context__
    return False
