"""Hand-over of entries left with consumer names that no running worker will use.

A worker reads the entries already delivered to its consumer name before new ones,
so work left by a crashed or stopped worker is taken up by the next worker in the
same slot. When a group became smaller, the higher slots have no next worker: their
entries are claimed for slot 0 of the same provider, which looks at its own entries
every second.
"""

import logging

import redis

from shared.keys import WORKER_GROUP, Keys
from shared.redis_client import text as _text
from worker.main import consumer_name

log = logging.getLogger(__name__)


def reassign_orphans(client: redis.Redis, keys: Keys, supervisor_name: str, provider: str, group_size: int) -> int:
    """Claim entries of this supervisor's unused slots for slot 0; returns how many moved."""
    if group_size < 1:
        return 0
    stream = keys.tasks(provider)
    live = {consumer_name(supervisor_name, provider, slot) for slot in range(group_size)}
    prefix = f"{supervisor_name}-{provider}-"
    target = consumer_name(supervisor_name, provider, 0)
    moved = 0
    try:
        summary = client.xpending(stream, WORKER_GROUP)
    except redis.ResponseError as exc:
        if "NOGROUP" in str(exc):
            return 0
        raise
    for consumer in summary.get("consumers") or []:
        name = _text(consumer["name"])
        if name in live or not name.startswith(prefix):
            continue
        while True:
            pending = client.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=100, consumername=name)
            if not pending:
                break
            ids = [_text(item["message_id"]) for item in pending]
            client.xclaim(stream, WORKER_GROUP, target, min_idle_time=0, message_ids=ids, justid=True)
            moved += len(ids)
        client.xgroup_delconsumer(stream, WORKER_GROUP, name)
    if moved:
        log.info("entries handed to slot 0 provider=%s count=%d consumer=%s", provider, moved, target)
    return moved
