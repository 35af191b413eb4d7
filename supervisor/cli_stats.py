"""`taskvisor stats`: task counts, run times and the error rate from SQL, queues from Redis."""

import time
from typing import Any

import click
import orjson
import redis

from shared.keys import Keys
from shared.redaction import redact_url
from shared.settings import Config
from shared.states import TaskStatus, TaskType
from shared.store import Store
from supervisor.cli_common import connection_options, open_redis, store_call
from supervisor.status import read_statuses

RUN_TIME_WINDOW_SECONDS = 24 * 3600
ERROR_RATE_WINDOW_SECONDS = 3600
# Run times are read for at most this many of the most recently completed tasks.
RUN_TIME_SAMPLE_LIMIT = 10000
PERCENTILES = (50, 95)
# Label of the row that sums all providers. It cannot clash with a provider id, because
# ids contain only A-Za-z0-9._- (see PROVIDER_ID_PATTERN in shared.keys).
ALL_PROVIDERS = "(all)"


@click.command()
@connection_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(config: Config, as_json: bool) -> None:
    """Show task counts, run times, queue lengths and the error rate.

    Counts, run times and the error rate come from SQL. Queue lengths and worker
    counts come from Redis. When Redis is unreachable, they are left out and a warning
    goes to stderr.
    """
    now = time.time()
    report = store_call(config, lambda store: _read_sql(store, config, now))
    report["queues"] = _read_queues(config)

    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_report(report)


def nearest_rank(sorted_values: list[float], percent: int) -> float | None:
    """Return the nearest-rank percentile of ascending values (1 to 100 percent), or None without values."""
    if not sorted_values:
        return None
    # The rank is ceil(percent / 100 * n), computed on integers so that 95 % of 20 is exactly 19.
    rank = max(-(-percent * len(sorted_values) // 100), 1)
    return sorted_values[rank - 1]


def _read_sql(store: Store, config: Config, now: float) -> dict[str, Any]:
    counts = store.count_by_provider_status()
    durations = store.run_durations(now - RUN_TIME_WINDOW_SECONDS, RUN_TIME_SAMPLE_LIMIT)
    errors, terminal, rejected = store.error_rate(now - ERROR_RATE_WINDOW_SECONDS)
    return {
        "generated_at": now,
        "status_counts": _status_counts(counts, config),
        "run_times": _run_times(durations),
        "error_rate": {
            "window_seconds": ERROR_RATE_WINDOW_SECONDS,
            "errors": errors,
            "terminal": terminal,
            "percent": 100 * errors / terminal if terminal else None,
            "rejected": rejected,
        },
    }


def _status_counts(counts: dict[str, dict[str, int]], config: Config) -> dict[str, dict[str, int]]:
    """Give every provider, configured or found in SQL, a count for every status and a total.

    Each status keeps its own count: `cancelled` is never added to `failed`.
    """
    statuses = [status.value for status in TaskStatus]
    found = {status for provider_counts in counts.values() for status in provider_counts}
    statuses.extend(sorted(found - set(statuses)))

    table: dict[str, dict[str, int]] = {ALL_PROVIDERS: dict.fromkeys(statuses, 0)}
    for provider in sorted(set(counts) | set(config.providers)):
        row = {status: counts.get(provider, {}).get(status, 0) for status in statuses}
        for status, count in row.items():
            table[ALL_PROVIDERS][status] += count
        table[provider] = row
    for row in table.values():
        row["total"] = sum(row.values())
    return table


def _run_times(durations: dict[str, list[float]]) -> dict[str, Any]:
    task_types = [task_type.value for task_type in TaskType]
    task_types.extend(sorted(set(durations) - set(task_types)))

    per_type = {}
    for task_type in task_types:
        values = sorted(durations.get(task_type, []))
        per_type[task_type] = {"tasks": len(values)}
        for percent in PERCENTILES:
            per_type[task_type][f"p{percent}_seconds"] = nearest_rank(values, percent)
    return {
        "window_seconds": RUN_TIME_WINDOW_SECONDS,
        "sample_limit": RUN_TIME_SAMPLE_LIMIT,
        "sample_limit_reached": sum(len(values) for values in durations.values()) >= RUN_TIME_SAMPLE_LIMIT,
        "task_types": per_type,
    }


def _read_queues(config: Config) -> dict[str, dict[str, int]] | None:
    """Read queue lengths and busy workers per configured provider, or None when Redis fails.

    Entries stay in the task stream until their task ends, so the waiting entries are the
    stream length minus the entries that busy workers are running.
    """
    keys = Keys(config.redis.prefix)
    queues = {}
    try:
        client = open_redis(config)
        try:
            # Worker counts come from the running supervisors, which know about resizes,
            # pauses and providers added through Redis; with none running there are no workers.
            running: dict[str, int] = {}
            for status in read_statuses(client, keys):
                for provider, group in status.get("providers", {}).items():
                    running[provider] = running.get(provider, 0) + group.get("workers", 0)
            for provider in sorted(set(config.providers) | set(running)):
                # MULTI makes both reads see the same moment. It is legal on a cluster too,
                # because both keys share the provider's hash slot.
                pipeline = client.pipeline(transaction=True)
                pipeline.xlen(keys.tasks(provider))
                pipeline.hlen(keys.busy(provider))
                stream_length, busy = pipeline.execute()
                workers = running.get(provider, 0)
                queues[provider] = {
                    "queued": max(stream_length - busy, 0),
                    "busy": busy,
                    "idle": max(workers - busy, 0),
                    "workers": workers,
                }
        finally:
            client.close()
    except redis.RedisError as exc:
        click.echo(
            f"warning: Redis at {redact_url(config.redis.url)} failed ({exc});"
            " queue lengths and worker counts are missing",
            err=True,
        )
        return None
    return queues


def _print_report(report: dict[str, Any]) -> None:
    _print_status_counts(report["status_counts"])
    click.echo()
    _print_run_times(report["run_times"])
    if report["queues"] is not None:
        click.echo()
        _print_queues(report["queues"])
    click.echo()
    _print_error_rate(report["error_rate"])


def _print_status_counts(table: dict[str, dict[str, int]]) -> None:
    click.echo("Tasks by status, all time (SQL)")
    width = max(len("PROVIDER"), *(len(name) for name in table))
    columns = list(table[ALL_PROVIDERS])
    click.echo(f"{'PROVIDER':{width}}" + "".join(f" {column.upper():>10}" for column in columns))
    for provider, row in table.items():
        click.echo(f"{provider:{width}}" + "".join(f" {row[column]:>10}" for column in columns))


def _print_run_times(run_times: dict[str, Any]) -> None:
    hours = run_times["window_seconds"] / 3600
    click.echo(f"Run time of tasks completed in the last {hours:g} h, nearest-rank percentiles (SQL)")
    task_types = run_times["task_types"]
    width = max(len("TYPE"), *(len(name) for name in task_types))
    header = f"{'TYPE':{width}} {'TASKS':>6}" + "".join(f" {f'P{percent}':>10}" for percent in PERCENTILES)
    click.echo(header)
    for task_type, row in task_types.items():
        cells = "".join(f" {_format_seconds(row[f'p{percent}_seconds']):>10}" for percent in PERCENTILES)
        click.echo(f"{task_type:{width}} {row['tasks']:>6}{cells}")
    if run_times["sample_limit_reached"]:
        click.echo(f"(only the {run_times['sample_limit']} most recently completed tasks were read)")


def _print_queues(queues: dict[str, dict[str, int]]) -> None:
    click.echo("Queue per provider, now (Redis)")
    if not queues:
        click.echo("no providers configured: pass --config with a 'providers' mapping")
        return
    width = max(len("PROVIDER"), *(len(name) for name in queues))
    click.echo(f"{'PROVIDER':{width}} {'QUEUED':>8} {'BUSY':>6} {'IDLE':>6} {'WORKERS':>8}")
    for provider, row in queues.items():
        click.echo(f"{provider:{width}} {row['queued']:>8} {row['busy']:>6} {row['idle']:>6} {row['workers']:>8}")


def _print_error_rate(error_rate: dict[str, Any]) -> None:
    percent = "n/a" if error_rate["percent"] is None else f"{error_rate['percent']:.1f} %"
    hours = error_rate["window_seconds"] / 3600
    click.echo(
        f"Errors in the last {hours:g} h: {error_rate['errors']} of {error_rate['terminal']} tasks ({percent})"
        " ended as failed or timeout; cancelled tasks count as ended, not as errors"
    )
    if error_rate["rejected"]:
        click.echo(
            f"Rejected entries in the last {hours:g} h: {error_rate['rejected']} (invalid input from producers,"
            " not counted above; see `taskvisor list --status failed` and the dead-letter stream)"
        )


def _format_seconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"
