"""The SQL store: a durable mirror of task and instance state, on SQLite or MySQL/MariaDB.

`open_store(url)` connects. Call `init_schema()` on the store before the first write.
"""

import os
from urllib.parse import SplitResult, unquote, urlsplit

from shared.errors import StoreError
from shared.redaction import redact_url
from shared.store.base import Store
from shared.store.records import InstanceRecord, TaskRecord
from shared.store.sqlite import SqliteStore

__all__ = ["InstanceRecord", "Store", "TaskRecord", "open_store", "redact_url"]

DEFAULT_MYSQL_PORT = 3306

ACCEPTED_FORMS = (
    "sqlite:///relative/path.db (relative to the base directory), sqlite:////absolute/path.db,"
    " or mysql://user:password@host:port/database (also mariadb://; password and port are optional)"
)


def open_store(url: str, base_dir: str = ".", create: bool = True) -> Store:
    """Connect to the store at `url` and return it.

    A relative SQLite path is taken relative to `base_dir`. With `create` False, a SQLite
    file that does not exist is an error instead of a new empty database. Raises StoreError
    if the URL is invalid or the database cannot be opened. Messages show the URL with the
    password as ***.
    """
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = _sqlite_path(url, parts, base_dir)
        if not create and not os.path.exists(path):
            raise StoreError(
                f"SQLite database {path} (from {redact_url(url)}) does not exist: check database.url in the"
                " config, or run `taskvisor db init` (or start the supervisor) to create it"
            )
        return SqliteStore(path, redact_url(url))
    if scheme in ("mysql", "mariadb"):
        return _open_mysql(url, parts)
    raise _invalid(url, f"unknown scheme {parts.scheme!r}")


def _split(url: str) -> SplitResult:
    if not isinstance(url, str) or "://" not in url:
        raise _invalid(str(url), "missing scheme")
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise _invalid(url, str(exc)) from None


def _sqlite_path(url: str, parts: SplitResult, base_dir: str) -> str:
    if parts.netloc:
        raise _invalid(url, f"a SQLite URL has no host, but {parts.netloc!r} was given (use three or four slashes)")
    if parts.query or parts.fragment:
        raise _invalid(url, "a SQLite URL takes no query or fragment")

    # urlsplit keeps the slash before the path: '/relative.db' or '//absolute.db'.
    path = unquote(parts.path[1:])
    if not path or path.endswith("/"):
        raise _invalid(url, "the database file name is missing")
    if os.path.isabs(path):
        return path
    return os.path.join(base_dir, path)


def _open_mysql(url: str, parts: SplitResult) -> Store:
    if parts.query or parts.fragment:
        raise _invalid(url, "a MySQL URL takes no query or fragment")
    if not parts.hostname:
        raise _invalid(url, "the host is missing")
    if not parts.username:
        raise _invalid(url, "the user is missing")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = DEFAULT_MYSQL_PORT
    if not 1 <= port <= 65535:
        raise _invalid(url, "the port is not a number from 1 to 65535")

    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise _invalid(url, "the database name is missing")
    if "/" in database:
        raise _invalid(url, f"the database name {database!r} contains '/'")

    password = unquote(parts.password) if parts.password is not None else None
    # Imported here, so that PyMySQL is loaded only by processes that use MySQL.
    from shared.store.mysql import MysqlStore

    return MysqlStore(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username),
        password=password,
        database=database,
        display_url=redact_url(url),
    )


def _invalid(url: str, reason: str) -> StoreError:
    return StoreError(f"invalid database URL {redact_url(url)!r}: {reason}. Accepted forms: {ACCEPTED_FORMS}")
