"""`taskvisor purge`: delete finished tasks older than a given age from Redis and SQL."""

import contextlib
import sys
import time
from collections.abc import Iterator

import click
import redis

from shared.errors import StoreError
from shared.keys import Keys
from shared.redaction import redact_url
from shared.settings import Config
from shared.store import Store
from supervisor.cli_common import (
    connection_options,
    display_time,
    fail,
    open_redis,
    store_call,
)
from supervisor.retention import (
    DURATION_RULE,
    RedisPurger,
    parse_duration,
    purge_sql_batches,
)


def _duration(context: click.Context, parameter: click.Parameter, value: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class _NoProgress:
    def update(self, steps: int) -> None:
        pass


@contextlib.contextmanager
def progress(length: int, label: str) -> Iterator:
    """Show a progress bar on stderr when it is a terminal, and draw nothing otherwise."""
    if not sys.stderr.isatty():
        yield _NoProgress()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar


@click.command()
@connection_options()
@click.option("--older-than", "age", required=True, callback=_duration, metavar="AGE",
              help=f"Delete tasks that ended longer ago than this: {DURATION_RULE}.")
@click.option("--dry-run", is_flag=True, help="Only count the tasks that would be deleted.")
def purge(config: Config, age: int, dry_run: bool) -> None:
    """Delete finished tasks (completed, failed, timeout, cancelled) older than AGE.

    In Redis it deletes each task's status hash, history list and task-index entry; in
    SQL the task rows, in batches. Tasks that have not ended are never deleted.
    """
    before = time.time() - age
    redis_count = _purge_redis(config, before, dry_run)
    sql_count = store_call(config, lambda store: _purge_sql(store, before, dry_run))

    ended_before = display_time("ended_at", before)
    if dry_run:
        click.echo(
            f"dry run: {redis_count} finished tasks in Redis and {sql_count} in SQL ended before {ended_before}; "
            f"nothing was deleted"
        )
    else:
        click.echo(f"purged {redis_count} finished tasks from Redis and {sql_count} from SQL that ended before {ended_before}")


def _purge_redis(config: Config, before: float, dry_run: bool) -> int:
    count = 0
    try:
        client = open_redis(config)
        try:
            purger = RedisPurger(client, Keys(config.redis.prefix))
            with progress(purger.task_count(), "Redis task ids") as bar:
                for tasks in purger.scan_all():
                    expired = purger.expired(tasks, before)
                    count += len(expired) if dry_run else purger.delete(expired, before)
                    bar.update(len(tasks))
        finally:
            client.close()
    except redis.RedisError as exc:
        done = "" if dry_run else f" after deleting {count} tasks"
        fail(f"purge failed: Redis at {redact_url(config.redis.url)} failed{done}: {exc}")
    return count


def _purge_sql(store: Store, before: float, dry_run: bool) -> int:
    total = store.count_finished_before(before)
    if dry_run:
        return total
    deleted = 0
    try:
        with progress(total, "SQL task rows ") as bar:
            for count in purge_sql_batches(store, before):
                deleted += count
                bar.update(count)
    except StoreError as exc:
        raise StoreError(f"{exc} (after deleting {deleted} rows)") from exc
    return deleted
