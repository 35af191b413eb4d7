"""The supervisor's status record in Redis, read by `taskvisor provider list`.

Every tick the supervisor writes `<prefix>:supervisor:<name>`, a JSON object with a
lifetime of a few seconds, so a supervisor that died disappears from the listing.

The record also reserves the name for one running supervisor. Two supervisors with one
name would share the workers' consumer names, and each would release the leases of
the other's workers as those of its own dead ones, so a task could run twice. A
supervisor therefore claims the record before it forks (`claim_name`), and warns
when a write replaces a record that another supervisor wrote.
"""

import logging
import os
import socket
import time

import orjson
import redis

from shared.errors import TaskvisorError
from shared.keys import Keys
from shared.process import process_alive
from shared.redis_client import is_cluster
from shared.settings import Config
from supervisor.children import Children

log = logging.getLogger(__name__)

# Milliseconds the record lives without being written again.
STATUS_TTL_MS = 5000
# Seconds between two reads of another supervisor's record while waiting for it to expire.
CLAIM_POLL_SECONDS = 0.1


def status_key(keys: Keys, supervisor_name: str) -> str:
    return f"{keys.prefix}:supervisor:{supervisor_name}"


def build_status(config: Config, children: Children, started_at: float, errors: dict[str, str], token: str) -> dict:
    providers = {}
    for provider, settings in config.providers.items():
        workers = [c for c in children.by_pid.values() if c.role == "worker" and c.provider == provider]
        providers[provider] = {
            "target": settings.group_size,
            "workers": sum(1 for child in workers if not child.retiring),
            "retiring": sum(1 for child in workers if child.retiring),
            "paused": settings.paused,
            "allowConcurrentTasks": settings.allow_concurrent_tasks,
            "maxConcurrentTasks": settings.max_concurrent_tasks,
            "error": errors.get(provider, ""),
        }
    return {
        "name": config.supervisor.name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "token": token,
        "started_at": started_at,
        "updated_at": time.time(),
        "providers": providers,
        "errors": errors,
    }


def publish_status(
    client: redis.Redis, keys: Keys, config: Config, children: Children, started_at: float, errors: dict[str, str],
    token: str,
) -> dict | None:
    """Write the status record and the providers' limits.

    Returns the record that this write replaced when another supervisor had written it
    (its `token` differs), else None.
    """
    document = build_status(config, children, started_at, errors, token)
    pipe = client.pipeline(transaction=False)
    pipe.set(status_key(keys, config.supervisor.name), orjson.dumps(document), px=STATUS_TTL_MS, get=True)
    # Workers read the provider's concurrency limit from Redis, so a live resize applies to
    # the workers forked before it, and two supervisors on one Redis share one limit.
    for provider, settings in config.providers.items():
        pipe.set(keys.limit(provider), settings.group_size)
    replaced = pipe.execute()[0]
    if replaced is None:
        return None
    record = _record(replaced)
    return None if record.get("token") == token else record


def claim_name(client: redis.Redis, keys: Keys, config: Config, children: Children, started_at: float, token: str) -> None:
    """Write this supervisor's first status record, or raise TaskvisorError when the name is in use.

    A record that another supervisor keeps writing means that it runs: the name is in
    use. A record that stops changing was left by a supervisor that died, and this one
    waits until it expires, at most STATUS_TTL_MS. A record left by a dead process on
    this host is replaced at once.
    """
    name = config.supervisor.name
    key = status_key(keys, name)
    document = orjson.dumps(build_status(config, children, started_at, {}, token))
    host = socket.gethostname()
    first_seen: dict | None = None
    waiting_logged = False
    # A record written by a supervisor expires within STATUS_TTL_MS, but one written by hand may not.
    wait_seconds = STATUS_TTL_MS / 1000 + 2
    deadline = time.monotonic() + wait_seconds
    while True:
        if client.set(key, document, px=STATUS_TTL_MS, nx=True):
            return
        raw = client.get(key)
        if raw is None:
            continue
        record = _record(raw)
        if record.get("token") == token:
            return
        pid = record.get("pid")
        if record.get("host") == host and isinstance(pid, int) and (pid == os.getpid() or not process_alive(pid)):
            log.info("status record of a dead supervisor with this name replaced name=%s old_pid=%d", name, pid)
            client.set(key, document, px=STATUS_TTL_MS)
            return
        if first_seen is None:
            first_seen = record
        elif record.get("updated_at") != first_seen.get("updated_at") or record.get("token") != first_seen.get("token"):
            where = f"pid {pid if pid is not None else '?'} on host {record.get('host') or 'unknown'}"
            raise TaskvisorError(
                f"supervisor name {name!r} is in use by a running supervisor ({where}), which keeps writing {key}:"
                " two supervisors with one name would share their workers' consumer names and could run a task twice;"
                " give each supervisor its own supervisor.name in its config"
            )
        if time.monotonic() > deadline:
            raise TaskvisorError(
                f"the status record {key} of supervisor name {name!r} did not expire within {wait_seconds:g} s, so it"
                " was written without a lifetime or with a longer one: if no supervisor with this name runs, delete it"
                f" (redis-cli DEL {key}) and start again"
            )
        if not waiting_logged:
            waiting_logged = True
            log.warning(
                "waiting for the status record of an earlier supervisor with this name to expire name=%s"
                " old_pid=%s old_host=%s at_most=%gs", name, record.get("pid", "?"), record.get("host") or "unknown",
                STATUS_TTL_MS / 1000,
            )  # fmt: skip
        time.sleep(CLAIM_POLL_SECONDS)


def _record(raw: bytes) -> dict:
    """Decode a status record; a record that is not a JSON object gives an empty dict."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def read_statuses(client: redis.Redis, keys: Keys) -> list[dict]:
    """Return the status records of every running supervisor on this Redis and prefix."""
    names = list(client.scan_iter(match=f"{keys.prefix}:supervisor:*", count=100))
    if not names:
        return []
    # The status keys have no hash tag, so on a cluster they lie in different slots.
    values = client.mget_nonatomic(names) if is_cluster(client) else client.mget(names)
    return [orjson.loads(value) for value in values if value]
