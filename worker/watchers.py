"""Background threads of a worker: the lease heartbeat, the cancel watcher and the process heartbeat.

The first two look at the task the worker is running right now, through
`CurrentTask`, and each uses its own Redis connection so a blocked read never delays
the other. The process heartbeat writes to the shared heartbeat table and needs no Redis.
"""

import logging
import os
import threading
import time

import redis

from shared import heartbeat
from shared.keys import Keys
from shared.redis_client import connect
from shared.schema import TaskSpec
from shared.taskstate import TaskState
from worker.drivers.base import TaskContext

log = logging.getLogger(__name__)

# Seconds between two looks at the current task's cancel state when no notice arrives.
CANCEL_POLL_SECONDS = 1.0
# Seconds between two process heartbeats.
HEARTBEAT_SECONDS = 1.0
# An idle worker whose main loop has not run for this long stops sending heartbeats.
# The idle loop's longest regular wait is a Redis reply, cut off after
# shared.redis_client.SOCKET_TIMEOUT_SECONDS (30 s), plus a retry delay of at most 5 s.
LOOP_STALL_SECONDS = 60.0


class CurrentTask:
    """The task a worker runs, shared with its threads. Both fields are None between tasks."""

    def __init__(self) -> None:
        self.spec: TaskSpec | None = None
        self.context: TaskContext | None = None
        # True once the worker is recording the task's end, which gives up its lease.
        self.ending = False

    def set(self, spec: TaskSpec | None, context: TaskContext | None) -> None:
        self.spec, self.context, self.ending = spec, context, False


def renew_leases(state: TaskState, current: CurrentTask, owner: str, consumer: str, lease_ms: int) -> None:
    """Renew the current task's lease every third of its lifetime, forever (a daemon thread)."""
    interval = lease_ms / 3000
    while True:
        time.sleep(interval)
        spec = current.spec
        if spec is None:
            continue
        try:
            renewed = state.renew_lease(spec, owner, consumer, lease_ms)
            # A task whose end is being recorded, or that ended meanwhile, gave up its lease on purpose.
            if not renewed and current.spec is spec and not current.ending:
                log.warning("lease lost task_id=%s provider=%s pid=%d", spec.id, spec.provider, os.getpid())
        except redis.RedisError as exc:
            log.warning("lease renewal failed task_id=%s provider=%s error=%s", spec.id, spec.provider, exc)


def send_heartbeats() -> None:
    """Write the worker's process heartbeat every second, forever (a daemon thread).

    While a task runs, its timeout bounds the main thread's wait, so the heartbeat
    goes on. While the worker is idle, it stops once the main loop stalls.
    """
    while True:
        heartbeat.beat_unless_stalled(LOOP_STALL_SECONDS)
        time.sleep(HEARTBEAT_SECONDS)


class CancelWatcher:
    """Stops the current task's driver when a cancel request for it arrives.

    It listens on the cancel channel for an immediate notice and also looks at the task
    hash every second, so a notice published while no worker listened is not missed. A
    request that a producer stored in the hash is applied here through the cancel script.
    """

    def __init__(self, redis_url: str, keys: Keys, state_factory, current: CurrentTask) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.state_factory = state_factory
        self.current = current

    def start(self) -> None:
        threading.Thread(target=self.run, name="cancel-watcher", daemon=True).start()

    def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                client = connect(self.redis_url)
                state = self.state_factory(client)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.cancel_channel())
                backoff = 0.5
                next_check = 0.0
                while True:
                    message = pubsub.get_message(timeout=CANCEL_POLL_SECONDS)
                    spec = self.current.spec
                    if spec is None:
                        continue
                    # Notices about other tasks must not delay the once-a-second look.
                    due = time.monotonic() >= next_check
                    if message is not None and not self._is_about(message, spec) and not due:
                        continue
                    next_check = time.monotonic() + CANCEL_POLL_SECONDS
                    self.check(state, spec)
            except redis.RedisError as exc:
                log.warning("cancel watcher lost redis retry_in=%.1fs pid=%d error=%s", backoff, os.getpid(), exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    @staticmethod
    def _is_about(message: dict, spec: TaskSpec) -> bool:
        data = message.get("data")
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        return text.strip() == f"{spec.provider} {spec.id}"

    def check(self, state: TaskState, spec: TaskSpec) -> None:
        status, requested = state.client.hmget(self.keys.task(spec.provider, spec.id), "status", "cancel_request_user")
        if requested is not None:
            reply = state.cancel(spec.provider, spec.id, stored=True)
            log.info("stored cancel request applied task_id=%s provider=%s reply=%s", spec.id, spec.provider, reply[0])
            if reply[0] == "cancelling":
                status = b"cancelling"
        context = self.current.context
        if status == b"cancelling" and context is not None and self.current.spec is spec:
            if not context.cancelled.is_set():
                log.info("cancel received; stopping task task_id=%s provider=%s pid=%d", spec.id, spec.provider, os.getpid())
            context.stop("cancel")
