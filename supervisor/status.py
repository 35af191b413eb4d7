"""The supervisor's status record in Redis, read by `taskvisor provider list`.

Every tick the supervisor writes `<prefix>:supervisor:<name>`, a JSON object with a
lifetime of a few seconds, so a supervisor that died disappears from the listing.
"""

import os
import time

import orjson
import redis

from shared.keys import Keys
from shared.redis_client import is_cluster
from shared.settings import Config
from supervisor.children import Children

# Milliseconds the record lives without being written again.
STATUS_TTL_MS = 5000


def status_key(keys: Keys, supervisor_name: str) -> str:
    return f"{keys.prefix}:supervisor:{supervisor_name}"


def build_status(config: Config, children: Children, started_at: float, errors: dict[str, str]) -> dict:
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
        "started_at": started_at,
        "updated_at": time.time(),
        "providers": providers,
        "errors": errors,
    }


def publish_status(
    client: redis.Redis, keys: Keys, config: Config, children: Children, started_at: float, errors: dict[str, str]
) -> None:
    document = build_status(config, children, started_at, errors)
    pipe = client.pipeline(transaction=False)
    pipe.set(status_key(keys, config.supervisor.name), orjson.dumps(document), px=STATUS_TTL_MS)
    # Workers read the provider's concurrency limit from Redis, so a live resize applies to
    # the workers forked before it, and two supervisors on one Redis share one limit.
    for provider, settings in config.providers.items():
        pipe.set(keys.limit(provider), settings.group_size)
    pipe.execute()


def read_statuses(client: redis.Redis, keys: Keys) -> list[dict]:
    """Return the status records of every running supervisor on this Redis and prefix."""
    names = list(client.scan_iter(match=f"{keys.prefix}:supervisor:*", count=100))
    if not names:
        return []
    # The status keys have no hash tag, so on a cluster they lie in different slots.
    values = client.mget_nonatomic(names) if is_cluster(client) else client.mget(names)
    return [orjson.loads(value) for value in values if value]
