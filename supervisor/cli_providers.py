"""`taskvisor provider`: list providers and change their settings while they run.

Changes go to the provider's settings hash in Redis, where they win over the config
file. A notice on the config channel follows each change, and a running supervisor
applies it within about a second (see shared/provider_settings.py).
"""

from pathlib import Path

import click
import orjson
import redis

from shared.errors import ConfigError
from shared.keys import PROVIDER_ID_PATTERN, Keys
from shared.provider_settings import (
    PROVIDER_KEYS,
    STATE_KEYS,
    config_channel,
    merge_provider,
    parse_value,
    providers_set_key,
    read_overrides,
    settings_key,
)
from shared.redaction import redact_url
from shared.redis_client import is_cluster
from shared.settings import Config, read_config_document
from supervisor.cli_common import connection_options, fail, open_redis
from supervisor.status import read_statuses


@click.group()
def provider() -> None:
    """List providers and change their settings at run time."""


def _file_providers(config: Config, config_path: str | None) -> dict:
    if not config_path:
        return {}
    return read_config_document(Path(config_path)).get("providers") or {}


def _parse_assignments(assignments: tuple[str, ...]) -> dict:
    values = {}
    for assignment in assignments:
        name, separator, text = assignment.partition("=")
        if not separator:
            fail(f"invalid setting {assignment!r}: expected KEY=VALUE, for example maxConcurrentTasks=4")
        if name not in PROVIDER_KEYS:
            fail(f"unknown key '{name}'; allowed: {', '.join(PROVIDER_KEYS)}")
        try:
            values[name] = parse_value(name, text)
        except ConfigError as exc:
            fail(str(exc))
    return values


def _write(client: redis.Redis, keys: Keys, provider_id: str, fields: dict, remove: tuple[str, ...] = (),
           add_to_set: bool = False) -> None:
    pipe = client.pipeline(transaction=True)
    if fields:
        pipe.hset(settings_key(keys, provider_id), mapping={name: orjson.dumps(value) for name, value in fields.items()})
    if remove:
        pipe.hdel(settings_key(keys, provider_id), *remove)
    if is_cluster(client):
        # On a cluster, MULTI may only touch keys of one slot, and the providers set has
        # no hash tag. A cluster pipeline cannot send PUBLISH either, so the set and the
        # notice follow the settings as separate commands.
        if fields or remove:
            pipe.execute()
        if add_to_set:
            client.sadd(providers_set_key(keys), provider_id)
        client.publish(config_channel(keys), provider_id)
        return
    if add_to_set:
        pipe.sadd(providers_set_key(keys), provider_id)
    pipe.publish(config_channel(keys), provider_id)
    pipe.execute()


def _check(config: Config, config_path: str | None, provider_id: str, changes: dict, remove: tuple[str, ...] = (),
           must_exist: bool = True):
    """Validate the provider's settings as they will be after the change; fail with the reason."""
    client = open_redis(config)
    keys = Keys(config.redis.prefix)
    file_providers = _file_providers(config, config_path)
    overrides, _errors = _redis_call(config, lambda: read_overrides(client, keys, list(file_providers)))
    if must_exist and provider_id not in file_providers and provider_id not in overrides:
        known = ", ".join(sorted(set(file_providers) | set(overrides))) or "none"
        fail(f"unknown provider '{provider_id}': known providers are {known}; add one with `taskvisor provider add`")
    merged = {**overrides.get(provider_id, {}), **changes}
    for name in remove:
        merged.pop(name, None)
    if "driver" not in merged and "driver" not in (file_providers.get(provider_id) or {}):
        fail(f"provider '{provider_id}' has no driver: pass driver='{{\"type\": \"command\", \"commands\": {{...}}}}'")
    try:
        return merge_provider(provider_id, file_providers.get(provider_id), merged)
    except ConfigError as exc:
        fail(f"not changed: {exc}")


def _redis_call(config: Config, action):
    try:
        return action()
    except redis.RedisError as exc:
        fail(f"Redis at {redact_url(config.redis.url)} failed: {exc}")


@provider.command(name="list")
@connection_options(uses_database=False, keep_path=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per provider.")
def list_providers(config: Config, config_path: str | None, as_json: bool) -> None:
    """Show each provider's settings, target and actual workers, busy workers and queue length."""

    def collect():
        client = open_redis(config)
        keys = Keys(config.redis.prefix)
        file_providers = _file_providers(config, config_path)
        overrides, errors = read_overrides(client, keys, list(file_providers))
        statuses = read_statuses(client, keys)
        rows = []
        for provider_id in sorted(set(file_providers) | set(overrides)):
            override = overrides.get(provider_id, {})
            try:
                settings = merge_provider(provider_id, file_providers.get(provider_id), override)
            except ConfigError as exc:
                settings, errors[provider_id] = None, str(exc)
            if settings is None and provider_id not in errors:
                continue
            running = [s["providers"][provider_id] for s in statuses if provider_id in s.get("providers", {})]
            busy = client.hlen(keys.busy(provider_id))
            length = client.xlen(keys.tasks(provider_id))
            source = "file" if provider_id in file_providers else "redis"
            if provider_id in file_providers and override:
                source = "file+redis"
            rows.append({
                "provider": provider_id,
                "allowConcurrentTasks": settings.allow_concurrent_tasks if settings else None,
                "maxConcurrentTasks": settings.max_concurrent_tasks if settings else None,
                "paused": settings.paused if settings else None,
                "target": settings.group_size if settings else None,
                "workers": sum(item["workers"] for item in running),
                "retiring": sum(item["retiring"] for item in running),
                "busy": busy,
                "queued": max(length - busy, 0),
                "source": source,
                "supervisors": len(running),
                "error": errors.get(provider_id, ""),
            })  # fmt: skip
        return rows

    rows = _redis_call(config, collect)
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row).decode())
        return
    click.echo(f"{'PROVIDER':16} {'MODE':10} {'TARGET':>6} {'WORKERS':>7} {'BUSY':>4} {'QUEUED':>6} {'PAUSED':6} {'SOURCE':10} ERROR")
    for row in rows:
        if row["allowConcurrentTasks"] is None:
            mode = "-"
        elif row["allowConcurrentTasks"]:
            mode = "concurrent"
        else:
            mode = "serial"
        workers = f"{row['workers']}" + (f"+{row['retiring']}" if row["retiring"] else "")
        click.echo(
            f"{row['provider']:16} {mode:10} {row['target'] if row['target'] is not None else '-':>6} {workers:>7} "
            f"{row['busy']:>4} {row['queued']:>6} {'yes' if row['paused'] else 'no':6} {row['source']:10} {row['error']}"
        )


@provider.command(name="set")
@connection_options(uses_database=False, keep_path=True)
@click.argument("provider_id")
@click.argument("assignments", nargs=-1, required=True)
def set_provider(config: Config, config_path: str | None, provider_id: str, assignments: tuple[str, ...]) -> None:
    """Change settings, as KEY=VALUE with JSON values: maxConcurrentTasks=4 'timeouts={"create": 600}'."""
    changes = _parse_assignments(assignments)
    settings = _check(config, config_path, provider_id, changes)
    if settings is None:
        fail(f"unknown provider '{provider_id}': add it with `taskvisor provider add` or in the config file")
    _redis_call(config, lambda: _write(open_redis(config), Keys(config.redis.prefix), provider_id, changes))
    shown = " ".join(f"{name}={orjson.dumps(value).decode()}" for name, value in changes.items())
    click.echo(f"{provider_id}: {shown}; workers: {settings.group_size} (applies within 2 s)")


@provider.command(name="unset")
@connection_options(uses_database=False, keep_path=True)
@click.argument("provider_id")
@click.argument("names", nargs=-1, required=True)
def unset_provider(config: Config, config_path: str | None, provider_id: str, names: tuple[str, ...]) -> None:
    """Drop settings set in Redis, so the config file's values apply again."""
    for name in names:
        if name not in PROVIDER_KEYS and name not in STATE_KEYS:
            fail(f"unknown key '{name}'; allowed: {', '.join(PROVIDER_KEYS + STATE_KEYS)}")
    settings = _check(config, config_path, provider_id, {}, remove=names)
    _redis_call(config, lambda: _write(open_redis(config), Keys(config.redis.prefix), provider_id, {}, remove=names))
    workers = settings.group_size if settings else 0
    click.echo(f"{provider_id}: {', '.join(names)} back to the config file's values; workers: {workers}")


@provider.command(name="add")
@connection_options(uses_database=False, keep_path=True)
@click.argument("provider_id")
@click.argument("assignments", nargs=-1)
def add_provider(config: Config, config_path: str | None, provider_id: str, assignments: tuple[str, ...]) -> None:
    """Add a provider, or bring back a removed one: driver='{"type": "command", "commands": {...}}' and other KEY=VALUE."""
    if not PROVIDER_ID_PATTERN.match(provider_id):
        fail(f"invalid provider id {provider_id!r}: expected 1-64 characters of A-Za-z0-9._-")
    changes = _parse_assignments(assignments)
    changes["removed"] = False
    settings = _check(config, config_path, provider_id, changes, must_exist=False)
    _redis_call(config, lambda: _write(open_redis(config), Keys(config.redis.prefix), provider_id, changes, add_to_set=True))
    click.echo(f"{provider_id}: added; workers: {settings.group_size} (applies within 2 s)")


def _set_state(config: Config, config_path: str | None, provider_id: str, name: str, value: bool, message: str) -> None:
    settings = _check(config, config_path, provider_id, {})
    if settings is None:
        fail(f"unknown provider '{provider_id}'")
    _redis_call(config, lambda: _write(open_redis(config), Keys(config.redis.prefix), provider_id, {name: value}))
    click.echo(f"{provider_id}: {message}")


@provider.command(name="remove")
@connection_options(uses_database=False, keep_path=True)
@click.argument("provider_id")
def remove_provider(config: Config, config_path: str | None, provider_id: str) -> None:
    """Stop a provider: its workers finish their current task and exit; queued tasks stay in its stream."""
    _set_state(config, config_path, provider_id, "removed", True,
               "removed; running tasks finish, queued tasks wait until it is added again")


@provider.command(name="pause")
@connection_options(uses_database=False, keep_path=True)
@click.argument("provider_id")
def pause_provider(config: Config, config_path: str | None, provider_id: str) -> None:
    """Stop taking new tasks; running tasks finish and new ones wait in the stream."""
    _set_state(config, config_path, provider_id, "paused", True, "paused; running tasks finish, and tasks that no worker has started by the time the supervisor applies it (within about a second) wait")


@provider.command(name="resume")
@connection_options(uses_database=False, keep_path=True)
@click.argument("provider_id")
def resume_provider(config: Config, config_path: str | None, provider_id: str) -> None:
    """Take tasks again after a pause."""
    _set_state(config, config_path, provider_id, "paused", False, "resumed")
