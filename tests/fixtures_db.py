"""Database URL fixtures: a SQLite file per test, and a throwaway MariaDB database per test.

The MariaDB fixtures connect with TASKVISOR_TEST_MYSQL_URL (`mysql://user:password@host:port`,
which bin/test sets to a user allowed to create databases named taskvisor_test_*), or as root
without a password on 127.0.0.1:3306. They fail, and never skip, when the server is
unreachable, so a missing server cannot pass as green.
"""

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pymysql
import pytest

_ADMIN = urlsplit(os.environ.get("TASKVISOR_TEST_MYSQL_URL") or "mysql://root@127.0.0.1:3306")
MARIADB_HOST = _ADMIN.hostname or "127.0.0.1"
MARIADB_PORT = _ADMIN.port or 3306
MARIADB_USER = unquote(_ADMIN.username or "root")
MARIADB_PASSWORD = unquote(_ADMIN.password or "")


def _run_admin(sql: str) -> None:
    """Run one statement as root, failing the test with instructions if MariaDB is unreachable."""
    try:
        connection = pymysql.connect(
            host=MARIADB_HOST, port=MARIADB_PORT, user=MARIADB_USER, password=MARIADB_PASSWORD, connect_timeout=5, autocommit=True
        )
    except pymysql.MySQLError as exc:
        pytest.fail(
            f"MariaDB is unreachable on {MARIADB_HOST}:{MARIADB_PORT} as {MARIADB_USER}: {exc}."
            " Start it, for example with"
            " `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`.",
            pytrace=False,
        )
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'taskvisor.db'}"


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """URL of a new, empty MariaDB database that is dropped after the test."""
    database = f"taskvisor_test_{secrets.token_hex(6)}"
    _run_admin(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        credentials = MARIADB_USER + (f":{quote(MARIADB_PASSWORD, safe='')}" if MARIADB_PASSWORD else "")
        yield f"mysql://{credentials}@{MARIADB_HOST}:{MARIADB_PORT}/{database}"
    finally:
        # A new connection, because the test may have outlasted the server's idle timeout.
        _run_admin(f"DROP DATABASE IF EXISTS `{database}`")


@pytest.fixture(params=["sqlite", "mariadb"])
def store_url(request: pytest.FixtureRequest) -> str:
    """URL of an empty database, once for each backend."""
    return request.getfixturevalue(f"{request.param}_url")
