"""Redis connections and consumer groups, the same way for every process."""

import logging

import redis

log = logging.getLogger(__name__)


# Seconds a reply may take. Every blocking read taskvisor makes waits at most a few
# seconds, so a longer silence means the server or the network is stuck.
SOCKET_TIMEOUT_SECONDS = 30


def connect(url: str) -> redis.Redis:
    """Return a client for `url`. Replies stay bytes; callers decode what they read."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT_SECONDS, health_check_interval=30
    )


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless it exists.

    A new group starts at id 0, so entries added before any worker ran are not skipped.
    """
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("consumer group created stream=%s group=%s", stream, group)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
