"""The `taskvisor` command line."""

import sys
from datetime import UTC, datetime
from functools import wraps

import click
import orjson
import redis

from shared.errors import ConfigError, InvalidEntry, StoreError, TaskvisorError
from shared.keys import Keys
from shared.logs import setup_logging
from shared.redaction import Redactor, redact_url
from shared.redis_client import connect
from shared.schema import parse_entry
from shared.settings import Config, apply_overrides, load_config
from shared.states import TaskType
from shared.store import open_store

LIST_LIMIT_MAX = 500

# `taskvisor get` shows these fields, in this order, whether the task comes from Redis or SQL.
GET_FIELDS = (
    "id", "provider", "type", "instance", "user", "status", "progress", "message", "error", "data", "result",
    "timeout", "attempts", "owner", "created_at", "started_at", "completed_at", "updated_at", "source",
)  # fmt: skip
SQL_TO_HASH_FIELDS = {
    "provider_id": "provider", "task_type": "type", "instance_id": "instance", "user_id": "user",
    "status_message": "message", "error_message": "error", "task_data": "data", "timeout_seconds": "timeout",
}  # fmt: skip


def connection_options(command):
    """Add --config, --redis-url and --database-url, resolved into one Config argument."""

    @click.option("--config", "config_path", envvar="TASKVISOR_CONFIG", type=click.Path(dir_okay=False),
                  help="YAML config file [env TASKVISOR_CONFIG].")
    @click.option("--redis-url", envvar="TASKVISOR_REDIS_URL",
                  help="Redis URL; overrides redis.url of the config [env TASKVISOR_REDIS_URL].")
    @click.option("--database-url", envvar="TASKVISOR_DATABASE_URL",
                  help="sqlite:///path or mysql://user:pass@host:port/db; overrides database.url [env TASKVISOR_DATABASE_URL].")
    @wraps(command)
    def wrapper(config_path, redis_url, database_url, **kwargs):
        try:
            config = apply_overrides(load_config(config_path), redis_url, database_url)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        return command(config=config, **kwargs)

    return wrapper


def fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", envvar="TASKVISOR_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Lowest level of log lines written to stderr [default: INFO for supervise and demo, WARNING otherwise].")
@click.pass_context
def cli(context: click.Context, log_level: str | None) -> None:
    """taskvisor: instance operations from Redis streams, run by per-provider worker groups."""
    long_running = context.invoked_subcommand in ("supervise", "demo")
    setup_logging(log_level or ("INFO" if long_running else "WARNING"))


@cli.command()
@connection_options
def supervise(config: Config) -> None:
    """Run the supervisor and its worker groups until SIGTERM or Ctrl-C."""
    from shared.logs import set_role
    from supervisor.main import Supervisor

    set_role("supervisor")
    if not config.providers:
        fail("the config defines no providers: pass --config with a file that has a 'providers' mapping")
    try:
        code = Supervisor(config).run()
    except TaskvisorError as exc:
        fail(str(exc))
    sys.exit(code)


@cli.command()
@connection_options
@click.option("--provider", required=True, help="Provider id, as in the config.")
@click.option("--type", "task_type", required=True, type=click.Choice([t.value for t in TaskType]), help="Task type.")
@click.option("--instance", default="", help="Instance id (required except for create).")
@click.option("--user", required=True, help="Id of the user the task belongs to.")
@click.option("--data", default="", help="Task data as a JSON object.")
@click.option("--timeout", default="", help="Timeout in seconds; overrides the provider's default for the type.")
@click.option("--id", "task_id", default="", help="Task id (1-64 of A-Za-z0-9._:-); derived from the stream entry when omitted.")
def submit(config: Config, provider, task_type, instance, user, data, timeout, task_id) -> None:
    """Push one task into a provider's stream and print its id."""
    if config.providers and provider not in config.providers:
        known = ", ".join(sorted(config.providers))
        fail(f"unknown provider '{provider}': the config defines {known}")
    fields = {"type": task_type, "user": user}
    for name, value in (("id", task_id), ("instance", instance), ("data", data), ("timeout", timeout)):
        if value:
            fields[name] = value
    try:
        parse_entry(provider, "0-1", fields)
    except InvalidEntry as exc:
        fail(f"task not submitted: {exc}")

    client = _redis(config)
    keys = Keys(config.redis.prefix)
    try:
        if task_id and client.hexists(keys.task_index(), task_id):
            fail(f"task not submitted: task id '{task_id}' is already used; choose another --id or omit it")
        entry_id = client.xadd(keys.tasks(provider), fields).decode()
    except redis.RedisError as exc:
        fail(f"task not submitted: Redis at {redact_url(config.redis.url)} failed: {exc}")
    spec = parse_entry(provider, entry_id, fields)
    click.echo(spec.id)


@cli.command()
@connection_options
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def get(config: Config, task_id: str, as_json: bool) -> None:
    """Show one task: its live state from Redis, else its row from SQL."""
    from shared.taskstate import TaskState

    task: dict | None = None
    try:
        client = connect(config.redis.url)
        state = TaskState(client, Keys(config.redis.prefix), config.redis.events_max_len,
                          config.redis.dead_max_len, Redactor(config.secret_fields))
        provider = state.locate(task_id)
        if provider:
            task = state.read(provider, task_id) or None
    except redis.RedisError as exc:
        click.echo(f"warning: Redis unavailable ({exc}); showing the SQL row", err=True)
    if task is None:
        row = _store_call(config, lambda store: store.get_task(task_id))
        if row is not None:
            task = {SQL_TO_HASH_FIELDS.get(name, name): value for name, value in row.items()}
            task["source"] = "database"
    else:
        task = _typed_hash_fields(task)
        task["source"] = "redis"
    if task is None:
        fail(f"task '{task_id}' not found in Redis or in the database")
    shown = {name: _display_time(name, task.get(name)) for name in GET_FIELDS if name in task}
    if as_json:
        click.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
        return
    for name, value in shown.items():
        click.echo(f"{name:14} {'' if value is None else value}")


@cli.command(name="list")
@connection_options
@click.option("--status", help="Only tasks in this status.")
@click.option("--provider", help="Only tasks of this provider.")
@click.option("--user", help="Only tasks of this user.")
@click.option("--instance", help="Only tasks of this instance.")
@click.option("--type", "task_type", help="Only tasks of this type.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, LIST_LIMIT_MAX), help="Rows per page.")
@click.option("--before", help="Cursor printed at the end of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def list_tasks(config: Config, status, provider, user, instance, task_type, limit, before, as_json) -> None:
    """List tasks from the SQL table, newest first."""
    rows = _store_call(
        config,
        lambda store: store.list_tasks(status=status, provider=provider, user=user, instance=instance,
                                       task_type=task_type, limit=limit, before=before),
    )
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row).decode())
    else:
        _print_task_table(rows)
    if len(rows) == limit:
        cursor = _store_call(config, lambda store: store.cursor_for(rows[-1]))
        click.echo(f"more rows: taskvisor list --before {cursor} (with the same filters)", err=True)


def _print_task_table(rows: list[dict]) -> None:
    header = f"{'ID':40} {'PROVIDER':12} {'TYPE':14} {'INSTANCE':16} {'STATUS':10} {'PROG':>4} {'CREATED (UTC)':19}  ERROR"
    click.echo(header)
    for row in rows:
        click.echo(
            f"{row['id']:40} {row['provider_id']:12} {row['task_type']:14} {(row['instance_id'] or '-'):16} "
            f"{row['status']:10} {row['progress']:>4.0f} {_display_time('created_at', row['created_at'])[:19]:19}  "
            f"{' '.join((row['error_message'] or '').split())[:60]}"
        )


@cli.group()
def db() -> None:
    """Manage the SQL schema."""


@db.command(name="init")
@connection_options
def db_init(config: Config) -> None:
    """Create or upgrade the SQL tables; safe to run more than once."""
    _store_call(config, lambda store: store.init_schema())
    click.echo(f"schema ready at {redact_url(config.database.url)}")


@cli.command()
@click.option("--data-dir", default="demo-data", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the embedded Redis's append-only file, the SQLite file and the config.")
@click.option("--port", default=6390, show_default=True, type=click.IntRange(1024, 65535),
              help="Loopback port of the embedded Redis.")
@click.option("--tasks", "task_count", default=12, show_default=True, type=click.IntRange(0, 10000),
              help="Size of the demo batch.")
def demo(data_dir: str, port: int, task_count: int) -> None:
    """Start an embedded Redis, SQLite and the example providers, then run a demo batch."""
    from supervisor.demo import run_demo

    try:
        sys.exit(run_demo(data_dir, port, task_count))
    except TaskvisorError as exc:
        fail(str(exc))


def _redis(config: Config) -> redis.Redis:
    return connect(config.redis.url)


def _store_call(config: Config, action):
    try:
        store = open_store(config.database.url, config.base_dir)
        try:
            return action(store)
        finally:
            store.close()
    except StoreError as exc:
        fail(f"database {redact_url(config.database.url)}: {exc}")


def _typed_hash_fields(task: dict[str, str]) -> dict:
    """Convert the text values of a status hash to the types the SQL row has."""
    typed: dict = dict(task)
    for name, kind in (("progress", float), ("timeout", float), ("attempts", int)):
        if typed.get(name):
            typed[name] = kind(typed[name])
    for name in ("result", "instance", "message", "error"):
        if typed.get(name) == "":
            typed[name] = None if name in ("result", "instance") else ""
    return typed


def _display_time(name: str, value):
    """Return a time field as UTC text; other fields unchanged."""
    if name.endswith("_at") and value == "":
        return None
    if name.endswith("_at") and value is not None:
        try:
            return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        except (TypeError, ValueError):
            return value
    return value


def main() -> None:
    cli()
