"""Helpers shared by the commands of the `taskvisor` command line."""

from datetime import UTC, datetime
from functools import wraps

import click
import redis

from shared.errors import ConfigError, StoreError
from shared.keys import Keys
from shared.redaction import Redactor
from shared.redis_client import connect
from shared.settings import Config, apply_overrides, load_config
from shared.store import open_store
from shared.taskstate import TaskState


def connection_options(*, uses_redis: bool = True, uses_database: bool = True, keep_path: bool = False):
    """Add --config and the URL options a command uses, resolved into one `config` argument.

    Without a config file, the command needs the URL options it uses, so that it never
    talks to a default server by accident. With `keep_path`, the command also receives
    `config_path`.
    """

    def decorate(command):
        @wraps(command)
        def wrapper(config_path, redis_url=None, database_url=None, **kwargs):
            if config_path is None:
                missing = [name for name, used, given in (("--redis-url", uses_redis, redis_url),
                                                          ("--database-url", uses_database, database_url)) if used and not given]
                if missing:
                    fail(f"no configuration: pass --config FILE or set TASKVISOR_CONFIG (or give {' and '.join(missing)})")
            try:
                config = apply_overrides(load_config(config_path), redis_url, database_url)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            if keep_path:
                kwargs["config_path"] = config_path
            return command(config=config, **kwargs)

        if uses_database:
            wrapper = click.option(
                "--database-url", envvar="TASKVISOR_DATABASE_URL",
                help="sqlite:///path or mysql://user:pass@host:port/db; overrides database.url [env TASKVISOR_DATABASE_URL].",
            )(wrapper)  # fmt: skip
        if uses_redis:
            wrapper = click.option(
                "--redis-url", envvar="TASKVISOR_REDIS_URL",
                help="Redis URL; overrides redis.url of the config [env TASKVISOR_REDIS_URL].",
            )(wrapper)  # fmt: skip
        return click.option(
            "--config", "config_path", envvar="TASKVISOR_CONFIG", type=click.Path(dir_okay=False),
            help="YAML config file [env TASKVISOR_CONFIG].",
        )(wrapper)  # fmt: skip

    return decorate


def fail(message: str) -> None:
    raise click.ClickException(message)


def open_redis(config: Config) -> redis.Redis:
    return connect(config.redis.url)


def task_state(config: Config, client: redis.Redis | None = None) -> TaskState:
    redis_settings = config.redis
    return TaskState(
        client or open_redis(config), Keys(redis_settings.prefix), redis_settings.events_max_len,
        redis_settings.dead_max_len, Redactor(config.secret_fields),
    )  # fmt: skip


def store_call(config: Config, action, create: bool = False):
    """Open the SQL store, run `action(store)`, close it; a StoreError ends the command.

    Only `create` makes a SQLite file that does not exist yet, so that a read with a wrong
    path reports it instead of leaving an empty database there.
    """
    try:
        store = open_store(config.database.url, config.base_dir, create=create)
        try:
            return action(store)
        finally:
            store.close()
    except StoreError as exc:
        fail(str(exc))


def typed_hash_fields(task: dict[str, str]) -> dict:
    """Convert the text values of a status hash to the types the SQL row has."""
    typed: dict = dict(task)
    for name, kind in (("progress", float), ("timeout", float), ("attempts", int), ("retries", int), ("retry_at", float),
                       ("manual_retries", int)):
        if typed.get(name):
            typed[name] = kind(typed[name])
    for name in ("result", "instance", "message", "error"):
        if typed.get(name) == "":
            typed[name] = None if name in ("result", "instance") else ""
    return typed


def display_time(name: str, value):
    """Return a time field (epoch seconds) as ISO 8601 UTC text; other fields unchanged."""
    if (name.endswith("_at") or name == "at") and value == "":
        return None
    if (name.endswith("_at") or name == "at") and value is not None:
        try:
            return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        except (TypeError, ValueError):
            return value
    return value
