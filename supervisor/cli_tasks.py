"""Task commands of the `taskvisor` command line: submit, get, list, cancel, retry."""

import sys
import time
from datetime import UTC, datetime

import click
import orjson
import redis

from shared.errors import InvalidEntry
from shared.keys import Keys
from shared.provider_settings import providers_set_key
from shared.redaction import redact_url
from shared.schema import parse_entry
from shared.settings import Config
from shared.states import TERMINAL_STATUSES, TaskStatus, TaskType
from supervisor.cli_common import (
    connection_options,
    display_time,
    fail,
    open_redis,
    store_call,
    task_state,
    typed_hash_fields,
)

LIST_LIMIT_MAX = 500

# `taskvisor get` shows these fields, in this order, whether the task comes from Redis or SQL.
GET_FIELDS = (
    "id", "provider", "type", "instance", "user", "status", "progress", "message", "error", "data", "result",
    "timeout", "attempts", "retries", "retry_at", "manual_retries", "owner", "workers", "cancelled_by", "cancel_reason",
    "cancel_error",
    "created_at", "started_at", "completed_at", "updated_at", "source",
)  # fmt: skip
SQL_TO_HASH_FIELDS = {
    "provider_id": "provider", "task_type": "type", "instance_id": "instance", "user_id": "user",
    "status_message": "message", "error_message": "error", "task_data": "data", "timeout_seconds": "timeout",
}  # fmt: skip


@click.command()
@connection_options()
@click.option("--provider", required=True, help="Provider id, as in the config.")
@click.option("--type", "task_type", required=True, type=click.Choice([t.value for t in TaskType]), help="Task type.")
@click.option("--instance", default="", help="Instance id (required except for create).")
@click.option("--user", required=True, help="Id of the user the task belongs to.")
@click.option("--data", default="", help="Task data as a JSON object.")
@click.option("--timeout", default="", help="Timeout in seconds; overrides the provider's default for the type.")
@click.option("--id", "task_id", default="", help="Task id (1-64 of A-Za-z0-9._:-); derived from the stream entry when omitted.")
def submit(config: Config, provider, task_type, instance, user, data, timeout, task_id) -> None:
    """Push one task into a provider's stream and print its id."""
    _check_provider(config, provider)
    driver = config.providers[provider].driver if provider in config.providers else None
    if driver is not None and driver.type == "command" and task_type not in driver.commands:
        fail(f"task not submitted: provider '{provider}' has no command for task type '{task_type}'; "
             f"add providers.{provider}.driver.commands.{task_type} to the config")
    fields = {"type": task_type, "user": user}
    for name, value in (("id", task_id), ("instance", instance), ("data", data), ("timeout", timeout)):
        if value:
            fields[name] = value
    try:
        parse_entry(provider, "0-1", fields)
    except InvalidEntry as exc:
        fail(f"task not submitted: {exc}")

    client = open_redis(config)
    keys = Keys(config.redis.prefix)
    try:
        if task_id and client.hexists(keys.task_index(), task_id):
            fail(f"task not submitted: task id '{task_id}' is already used; choose another --id or omit it")
        entry_id = client.xadd(keys.tasks(provider), fields).decode()
    except redis.RedisError as exc:
        fail(f"task not submitted: Redis at {redact_url(config.redis.url)} failed: {exc}")
    spec = parse_entry(provider, entry_id, fields)
    click.echo(spec.id)


@click.command()
@connection_options()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def get(config: Config, task_id: str, as_json: bool) -> None:
    """Show one task: its live state from Redis, else its row from SQL.

    Also shows the progress history kept in Redis and, for a running task, the time
    left before its timeout.
    """
    task: dict | None = None
    history: list[dict] = []
    try:
        state = task_state(config)
        provider = state.locate(task_id)
        if provider:
            task = state.read(provider, task_id) or None
            history = [orjson.loads(item) for item in state.client.lrange(state.keys.history(provider, task_id), 0, -1)]
    except redis.RedisError as exc:
        click.echo(f"warning: Redis unavailable ({exc}); showing the SQL row", err=True)
    if task is None:
        row = store_call(config, lambda store: store.get_task(task_id))
        if row is not None:
            task = {SQL_TO_HASH_FIELDS.get(name, name): value for name, value in row.items()}
            task["source"] = "database"
    else:
        task = typed_hash_fields(task)
        task["source"] = "redis"
    if task is None:
        fail(f"task '{task_id}' not found in Redis or in the database")
    shown = {name: display_time(name, task.get(name)) for name in GET_FIELDS if name in task}
    remaining = _remaining_seconds(task)
    if remaining is not None:
        shown["remaining_seconds"] = round(remaining, 1)
    timeline = [{**item, "at": display_time("at", item.get("at"))} for item in history]
    if as_json:
        click.echo(orjson.dumps({**shown, "history": timeline}, option=orjson.OPT_INDENT_2).decode())
        return
    for name, value in shown.items():
        click.echo(f"{name:17} {'' if value is None else value}")
    if timeline:
        click.echo("history")
        for item in timeline:
            progress = float(item.get("progress") or 0)
            extra = ""
            if item.get("worker"):
                extra += f"  worker={item['worker']}"
            if item.get("error"):
                extra += f"  error={item['error']}"
            click.echo(f"  {item['at']}  {item.get('status', ''):10} {progress:5.1f}%  {item.get('message') or ''}{extra}")


def _check_provider(config: Config, provider: str) -> None:
    """Fail unless the provider is in the config file or was added through Redis.

    Without providers in the config there is nothing to check against, so any id passes.
    """
    if not config.providers or provider in config.providers:
        return
    try:
        if open_redis(config).sismember(providers_set_key(Keys(config.redis.prefix)), provider):
            return
    except redis.RedisError:
        pass
    known = ", ".join(sorted(config.providers))
    fail(f"unknown provider '{provider}': known providers are {known} (from the config) and those added "
         f"with `taskvisor provider add`")


def _epoch(moment: datetime | None) -> float | None:
    """Return a naive datetime from the command line, taken as UTC, in epoch seconds."""
    return None if moment is None else moment.replace(tzinfo=UTC).timestamp()


def _remaining_seconds(task: dict) -> float | None:
    """Return the seconds left before a running task's timeout, or None when it is not running."""
    if task.get("status") not in ("running", "cancelling") or not task.get("started_at") or not task.get("timeout"):
        return None
    return max(0.0, float(task["started_at"]) + float(task["timeout"]) - time.time())


@click.command(name="list")
@connection_options()
@click.option("--status", type=click.Choice([status.value for status in TaskStatus]), help="Only tasks in this status.")
@click.option("--provider", help="Only tasks of this provider.")
@click.option("--user", help="Only tasks of this user.")
@click.option("--instance", help="Only tasks of this instance.")
@click.option("--type", "task_type", type=click.Choice([task_type.value for task_type in TaskType]), help="Only tasks of this type.")
@click.option("--created-from", type=click.DateTime(), help="Only tasks created at or after this UTC time (2026-12-01 or 2026-12-01T08:00:00).")
@click.option("--created-until", type=click.DateTime(), help="Only tasks created before this UTC time.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, LIST_LIMIT_MAX), help="Rows per page.")
@click.option("--before", help="Cursor printed at the end of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def list_tasks(config: Config, status, provider, user, instance, task_type, created_from, created_until, limit, before,
               as_json) -> None:
    """List tasks from the SQL table, newest first."""
    if provider:
        _check_provider(config, provider)
    rows = store_call(
        config,
        lambda store: store.list_tasks(status=status, provider=provider, user=user, instance=instance,
                                       task_type=task_type, limit=limit, before=before,
                                       created_from=_epoch(created_from), created_until=_epoch(created_until)),
    )
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row).decode())
    else:
        _print_task_table(rows)
    if len(rows) == limit:
        cursor = store_call(config, lambda store: store.cursor_for(rows[-1]))
        click.echo(f"more rows: taskvisor list --before {cursor} (with the same filters)", err=True)


def _print_task_table(rows: list[dict]) -> None:
    header = f"{'ID':40} {'PROVIDER':12} {'TYPE':14} {'INSTANCE':16} {'STATUS':10} {'PROG':>4} {'CREATED (UTC)':19}  ERROR"
    click.echo(header)
    for row in rows:
        click.echo(
            f"{row['id']:40} {row['provider_id']:12} {row['task_type']:14} {(row['instance_id'] or '-'):16} "
            f"{row['status']:10} {row['progress']:>4.0f} {display_time('created_at', row['created_at'])[:19]:19}  "
            f"{' '.join((row['error_message'] or '').split())[:60]}"
        )




# Exit codes of `taskvisor cancel` beyond 0 (cancelled) and 1 (rejected).
EXIT_ENDED_OTHERWISE = 3
EXIT_STILL_CANCELLING = 4


@click.command()
@connection_options(uses_database=False)
@click.argument("task_id")
@click.option("--user", default="", help="Cancel as this user: only the user's own tasks. Without it, as an administrator.")
@click.option("--reason", default="", help="Why the task is cancelled; stored on the task.")
@click.option("--provider", "provider_id", default="",
              help="Provider of the task; needed only for a task that no supervisor has registered yet.")
@click.option("--wait", "wait_seconds", default=10.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds to wait for a running task to end; 0 returns at once.")
def cancel(config: Config, task_id: str, user: str, reason: str, provider_id: str, wait_seconds: float) -> None:
    """Cancel a task: a pending one never starts, a running one is stopped.

    Exit codes: 0 cancelled (or the request is stored for a task not registered yet),
    1 rejected, 3 the task ended another way before it could be stopped, 4 still
    cancelling when --wait ran out.
    """
    state = task_state(config)
    try:
        located = state.locate(task_id)
        if provider_id and located and located != provider_id:
            fail(f"task '{task_id}' belongs to provider '{located}', not '{provider_id}'; nothing was changed")
        if provider_id and not located:
            _check_provider(config, provider_id)
        provider = located or provider_id or None
        if provider is None:
            fail(f"task '{task_id}' not found in Redis: check the id, or pass --provider for a task that "
                 f"no supervisor has registered yet")
        reply = state.cancel(provider, task_id, user=user, reason=reason)
        if reply[0] in ("cancelling", "queued"):
            state.client.publish(state.keys.cancel_channel(), f"{provider} {task_id}")
    except redis.RedisError as exc:
        fail(f"cancel failed: Redis at {redact_url(config.redis.url)}: {exc}")

    outcome = reply[0]
    if outcome == "finished":
        fail(f"task '{task_id}' already ended as {reply[1]}; nothing was changed")
    if outcome == "forbidden":
        fail(f"user '{user}' may not cancel task '{task_id}': it belongs to user '{reply[1]}'; nothing was changed")
    if outcome == "cancelled":
        click.echo(f"{task_id} cancelled before it started")
        return
    if outcome == "queued":
        click.echo(f"{task_id} is not registered yet; the cancel request is stored and applies when it is")
        return

    click.echo(f"{task_id} is being cancelled; its worker is stopping it", err=True)
    status = _wait_for_end(state, provider, task_id, wait_seconds)
    if status is None:
        click.echo(f"{task_id} is still cancelling after {wait_seconds:g} s; see taskvisor get {task_id}")
        sys.exit(EXIT_STILL_CANCELLING)
    click.echo(f"{task_id} {status}")
    if status != TaskStatus.CANCELLED:
        click.echo(f"{task_id} ended as {status} before it could be stopped", err=True)
        sys.exit(EXIT_ENDED_OTHERWISE)


def _wait_for_end(state, provider: str, task_id: str, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while True:
        status = state.read(provider, task_id).get("status", "")
        if status in TERMINAL_STATUSES:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


RETRY_STATUSES = (TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED)
BULK_RETRY_MAX = 10000


@click.command()
@connection_options()
@click.argument("task_ids", nargs=-1)
@click.option("--wait", "wait_seconds", default=0.0, show_default=True, type=click.FloatRange(0, 86400),
              help="Seconds to wait for one retried task to end; 0 returns at once.")
@click.option("--status", "statuses", multiple=True, type=click.Choice([str(status) for status in RETRY_STATUSES]),
              help="Bulk retry: tasks in this status (repeatable); found in SQL.")
@click.option("--provider", help="Bulk retry: only tasks of this provider.")
@click.option("--type", "task_type", type=click.Choice([task_type.value for task_type in TaskType]),
              help="Bulk retry: only tasks of this type.")
@click.option("--created-from", type=click.DateTime(), help="Bulk retry: only tasks created at or after this UTC time.")
@click.option("--created-until", type=click.DateTime(), help="Bulk retry: only tasks created before this UTC time.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, BULK_RETRY_MAX),
              help="Bulk retry: at most this many tasks.")
@click.option("--dry-run", is_flag=True, help="Bulk retry: list what would be retried, change nothing.")
def retry(config: Config, task_ids: tuple[str, ...], wait_seconds: float, statuses, provider, task_type, created_from,
          created_until, limit, dry_run) -> None:
    """Run failed, timed-out or cancelled tasks again, keeping their history of attempts.

    Give task ids, or select tasks with --status and the other filters (bulk retry,
    which finds them in SQL). Each task goes back to pending as a new entry of its
    provider's stream, behind the tasks already waiting for its instance. Exit codes for
    one id: 0 queued (or, with --wait, completed), 1 refused, 3 with --wait: it ended
    other than completed, 4 with --wait: still not ended. A bulk retry exits 1 when any
    task was refused.
    """
    bulk = bool(statuses or provider or task_type or created_from or created_until)
    if bulk and task_ids:
        fail("give task ids or filters (--status, --provider, --type, --created-from, --created-until), not both")
    if not bulk and not task_ids:
        fail("give one or more task ids, or select tasks with --status (failed, timeout, cancelled) and other filters")
    if bulk:
        _bulk_retry(config, statuses or RETRY_STATUSES, provider, task_type, created_from, created_until, limit, dry_run)
        return
    if len(task_ids) > 1 or dry_run:
        _retry_many(config, list(task_ids), dry_run)
        return
    task_id = task_ids[0]
    state = task_state(config)
    try:
        provider_id, task, refusal = _retry_one(state, task_id)
    except redis.RedisError as exc:
        fail(f"retry failed: Redis at {redact_url(config.redis.url)}: {exc}")
    if refusal:
        fail(refusal)
    click.echo(f"{task_id} queued again as entry {task['new_entry']} (attempts so far: {task.get('attempts', '0')})")
    if wait_seconds <= 0:
        return
    final = _wait_for_end(state, provider_id, task_id, wait_seconds)
    if final is None:
        click.echo(f"{task_id} has not ended after {wait_seconds:g} s; see taskvisor get {task_id}")
        sys.exit(EXIT_STILL_CANCELLING)
    click.echo(f"{task_id} {final}")
    if final != TaskStatus.COMPLETED:
        sys.exit(EXIT_ENDED_OTHERWISE)


def _retry_one(state, task_id: str, dry_run: bool = False) -> tuple[str, dict, str]:
    """Retry one task; returns (provider, task fields, refusal message or '')."""
    provider = state.locate(task_id)
    if provider is None:
        return "", {}, (f"task '{task_id}' not found in Redis: check the id; only tasks whose state Redis still "
                        f"holds can be retried")
    task = state.read(provider, task_id)
    if not task:
        return provider, {}, f"task '{task_id}' not found in Redis under provider '{provider}'; nothing was changed"
    status = task.get("status", "")
    if status not in RETRY_STATUSES:
        return provider, task, _wrong_status(task_id, status)
    if task.get("error", "").startswith("rejected: "):
        return provider, task, (f"task '{task_id}' cannot be retried: its entry was rejected "
                                f"({task['error'][len('rejected: '):]}); push a corrected entry with a new id")
    hidden = _secret_fields_in(state.redactor, task.get("data") or "{}")
    if hidden:
        return provider, task, (f"task '{task_id}' cannot be retried: its data held secret fields ({', '.join(hidden)}) "
                                f"whose values are not kept; submit a new task with the same data instead")
    if dry_run:
        return provider, task, ""
    entry = {name: task.get(name, "") for name in ("id", "type", "instance", "user", "data")}
    if task.get("timeout"):
        entry["timeout"] = task["timeout"]
    reply = state.retry(provider, task_id, "admin", entry)
    if reply[0] == "refused":
        return provider, task, _wrong_status(task_id, reply[1])
    if reply[0] != "ok":
        return provider, task, f"task '{task_id}' not found in Redis; nothing was changed"
    task["new_entry"] = reply[1]
    return provider, task, ""


def _wrong_status(task_id: str, status: str) -> str:
    return f"task '{task_id}' is {status}: only failed, timeout or cancelled tasks can be retried; nothing was changed"


def _bulk_retry(config: Config, statuses, provider, task_type, created_from, created_until, limit, dry_run) -> None:
    if provider:
        _check_provider(config, provider)
    task_ids: list[str] = []
    for status in statuses:
        rows = store_call(
            config,
            lambda store, status=status: store.list_tasks(status=str(status), provider=provider, task_type=task_type,
                                                          limit=limit, created_from=_epoch(created_from),
                                                          created_until=_epoch(created_until)),
        )  # fmt: skip
        # A rejected entry cannot be retried, so a bulk retry leaves it out instead of refusing it.
        task_ids += [row["id"] for row in rows if not (row.get("error_message") or "").startswith("rejected: ")]
    _retry_many(config, sorted(set(task_ids))[:limit], dry_run)


def _retry_many(config: Config, task_ids: list[str], dry_run: bool) -> None:
    """Retry each task, with a progress bar on a terminal, then print a summary line."""
    if not task_ids:
        click.echo("no task matches; nothing was changed")
        return
    state = task_state(config)
    queued = 0
    refusals: list[str] = []
    label = "checking" if dry_run else "retrying"
    try:
        hidden = not sys.stderr.isatty()
        with click.progressbar(task_ids, label=label, file=sys.stderr, show_pos=True, hidden=hidden) as bar:
            for task_id in bar:
                _provider, _task, refusal = _retry_one(state, task_id, dry_run)
                if refusal:
                    refusals.append(refusal)
                else:
                    queued += 1
    except redis.RedisError as exc:
        fail(f"retry stopped after {queued} tasks: Redis at {redact_url(config.redis.url)}: {exc}")
    for refusal in refusals:
        click.echo(f"refused: {refusal}", err=True)
    verb = "would be queued again" if dry_run else "queued again"
    click.echo(f"{queued} of {len(task_ids)} tasks {verb}; {len(refusals)} refused")
    if refusals:
        sys.exit(1)


def _secret_fields_in(redactor, data_text: str) -> list[str]:
    """Return the names of secret fields anywhere in the task's stored data."""
    try:
        data = orjson.loads(data_text)
    except orjson.JSONDecodeError:
        return ["data"]
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                if redactor.is_secret(str(name)):
                    found.append(str(name))
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(data)
    return found
