"""A client for panels written in Python: submit tasks, read and follow them, cancel them.

It uses only the public producer contract of docs/protocol.md, through redis-py, so it
works against any running supervisor that shares its Redis and key prefix. Entries are
checked with `shared.schema.parse_entry` before they are sent, which is the function
the workers use, so an entry that passes here is not dead-lettered for its fields.

    from shared.client import TaskvisorClient

    client = TaskvisorClient.from_url("redis://127.0.0.1:6379/0")
    task_id = client.submit("pve-1", "start", instance="vm-42", user="17")
    task = client.wait("pve-1", task_id, timeout=60)
"""

import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec
import orjson
import redis

from shared import errors
from shared.errors import InvalidEntry, TaskvisorError
from shared.keys import PROVIDER_ID_PATTERN, Keys
from shared.provider_settings import (
    PROVIDER_KEYS,
    STATE_KEYS,
    config_channel,
    settings_key,
)
from shared.redis_client import connect, is_cluster, text as _text
from shared.schema import PROTOCOL_VERSION, derive_task_id, parse_entry
from shared.states import TERMINAL_STATUSES, TaskStatus, TaskType

# The `cancel_request_user` value of an administrator, who may cancel any task.
ADMIN = "*"
# The fields that `submit` sets itself, so `extra_fields` may not contain them.
CONTRACT_FIELDS = frozenset({"v", "id", "type", "instance", "user", "timeout", "data"})
# Maximum seconds that one blocking read waits while following events. After a read
# that returns nothing, the status hash is read, which finds changes whose events were
# trimmed from the stream.
FOLLOW_READ_SECONDS = 1.0
CANCEL_POLL_SECONDS = 0.02
FIELD_IN_REASON = re.compile(r"^field '([^']+)'")


class ClientError(TaskvisorError):
    """Root of the errors that `TaskvisorClient` raises."""


class InvalidTask(ClientError, ValueError):
    """A task was not submitted because a field breaks the contract.

    `field` names the field and `reason` states which rule it broke, in the words of
    the dead-letter reasons.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"task not submitted: {reason}")
        self.field = field
        self.reason = reason


class DuplicateTaskId(InvalidTask):
    """The task id is already recorded in `<prefix>:task-index`, and every id can be used once."""


class TaskNotFound(ClientError, errors.TaskNotFound):
    """The provider has no status hash for this task id."""


class CancelRejected(ClientError):
    """A cancel request was rejected for `reason`. Nothing about the task changed."""

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(f"cancel of task '{task_id}' rejected: {reason}")
        self.task_id = task_id
        self.reason = reason


class WaitTimeout(ClientError, TimeoutError):
    """A deadline passed first. `task` is the last state seen, or None before registration."""

    def __init__(self, message: str, task: "Task | None") -> None:
        super().__init__(message)
        self.task = task


class Task(msgspec.Struct, frozen=True):
    """One task's state, read from its status hash or from an event.

    Times are epoch seconds. `data` and `result` are JSON text with secret fields
    masked. `fields` contains every field as read, including those this version of
    the client does not know and, for an event, `instance_status` and `instance_changed`.
    """

    id: str
    provider: str
    type: str
    instance: str
    user: str
    # A TaskStatus. A status that a newer supervisor writes and this client does not
    # know stays plain text instead of failing the read.
    status: str
    progress: float
    message: str
    error: str
    data: str
    result: str
    timeout: float | None
    attempts: int
    version: int
    created_at: float | None
    started_at: float | None
    completed_at: float | None
    updated_at: float | None
    cancelled_by: str
    cancel_reason: str
    cancel_error: str
    fields: dict[str, str]

    @property
    def finished(self) -> bool:
        """True once the task is `completed`, `failed`, `timeout` or `cancelled`."""
        return self.status in TERMINAL_STATUSES


class TaskvisorClient:
    """Producer operations on one Redis database and key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "taskvisor") -> None:
        self.redis = client
        self.keys = Keys(prefix)

    @classmethod
    def from_url(cls, url: str, prefix: str = "taskvisor") -> "TaskvisorClient":
        """Connect to the Redis at `url`, in any form that `redis.url` takes, such as redis://127.0.0.1:6379/0."""
        return cls(connect(url, socket_timeout=10), prefix)

    # -- submit -----------------------------------------------------------------

    def submit(
        self,
        provider: str,
        task_type: TaskType | str,
        *,
        user: str,
        instance: str = "",
        data: Mapping[str, Any] | None = None,
        timeout: float | str | None = None,
        task_id: str | None = None,
        extra_fields: Mapping[str, str] | None = None,
    ) -> str:
        """Check the task against the contract, push it with XADD and return its task id.

        Without `task_id` the id is derived as `<provider>:<entry id>`. `timeout` is in
        seconds. `extra_fields` are the panel's own fields, such as a request id, which
        taskvisor ignores. Raises InvalidTask, or DuplicateTaskId for an id already used.
        An id that another producer takes between the check and the XADD is still
        dead-lettered by the workers.
        """
        if not PROVIDER_ID_PATTERN.match(provider):
            raise InvalidTask("provider", f"provider {provider!r} is invalid: expected 1-64 characters of A-Za-z0-9._-")
        fields = self._entry_fields(task_type, user, instance, data, timeout, task_id, extra_fields)
        try:
            parse_entry(provider, "0-1", fields)
        except InvalidEntry as exc:
            match = FIELD_IN_REASON.match(str(exc))
            raise InvalidTask(match.group(1) if match else "", str(exc)) from None

        if task_id:
            first_owner = self.redis.hget(self.keys.task_index(), task_id)
            if first_owner is not None:
                raise DuplicateTaskId(
                    "id", f"task id '{task_id}' is already used by entry {_text(first_owner)}; choose another id"
                )
        entry_id = _text(self.redis.xadd(self.keys.tasks(provider), fields))
        return task_id or derive_task_id(provider, entry_id)

    @staticmethod
    def _entry_fields(task_type, user, instance, data, timeout, task_id, extra_fields) -> dict[str, str]:
        fields: dict[str, str] = {}
        for name, value in (extra_fields or {}).items():
            if name in CONTRACT_FIELDS:
                raise InvalidTask(name, f"field '{name}' is part of the contract: pass it as an argument of submit")
            fields[name] = str(value)
        fields.update({"v": PROTOCOL_VERSION, "type": str(task_type), "user": user})
        if task_id:
            fields["id"] = task_id
        if instance:
            fields["instance"] = instance
        if timeout is not None:
            fields["timeout"] = _timeout_text(timeout)
        if data is not None:
            try:
                fields["data"] = orjson.dumps(data).decode()
            except TypeError as exc:
                raise InvalidTask("data", f"field 'data' cannot be encoded as JSON: {exc}") from None
        return fields

    # -- read and follow ----------------------------------------------------------

    def locate(self, task_id: str) -> str | None:
        """Return the provider of a registered task id, or None when no provider has it."""
        value = self.redis.hget(self.keys.task_index(), task_id)
        return _text(value).split(" ", 1)[0] if value else None

    def get(self, provider: str, task_id: str) -> Task:
        """Read the task's status hash, raising TaskNotFound when it has none yet."""
        task = self._read(provider, task_id)
        if task is None:
            raise TaskNotFound(
                f"task '{task_id}' not found for provider '{provider}': it has no status hash. A task is "
                f"registered about a second after its XADD while a supervisor runs"
            )
        return task

    def follow(self, provider: str, task_id: str, timeout: float) -> Iterator[Task]:
        """Yield the task's current state, then each change, until it ends.

        Changes come from the provider's event stream, and each is yielded once, in
        order of `version`. A task that is not registered yet is waited for. Raises
        WaitTimeout when the task has not ended `timeout` seconds after the call.
        """
        deadline = time.monotonic() + timeout
        events_key = self.keys.events(provider)
        # Note the newest event before reading the hash, so no later change is missed.
        newest = self.redis.xrevrange(events_key, count=1)
        position = _text(newest[0][0]) if newest else "0-0"
        last = self._read(provider, task_id)
        if last is not None:
            yield last

        while last is None or not last.finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = f"still {last.status}" if last else "not registered yet"
                raise WaitTimeout(f"task '{task_id}' did not end within {timeout:g} s: {state}", last)
            # BLOCK 0 would wait forever, so the shortest wait is 1 ms.
            block_ms = max(1, int(min(remaining, FOLLOW_READ_SECONDS) * 1000))
            reply = self.redis.xread({events_key: position}, count=100, block=block_ms)
            if not reply:
                current = self._read(provider, task_id)
                if current is None or (last is not None and current.version <= last.version):
                    continue
                # Events written since the blocking read returned come first. When there
                # are none, the task's events were trimmed from the stream before they were
                # read, and the hash is the only record of the change.
                reply = self.redis.xread({events_key: position}, count=100)
                if not reply:
                    last = current
                    yield current
                    continue
            for _stream, entries in reply:
                for entry_id, raw in entries:
                    position = _text(entry_id)
                    fields = {_text(name): _text(value) for name, value in raw.items()}
                    if fields.get("id") != task_id:
                        continue
                    event = _task_from_fields(provider, fields)
                    if last is not None and event.version <= last.version:
                        continue
                    last = event
                    yield event
                    if event.finished:
                        return

    def wait(self, provider: str, task_id: str, timeout: float) -> Task:
        """Return the task's final state, raising WaitTimeout after `timeout` seconds."""
        task: Task | None = None
        for task in self.follow(provider, task_id, timeout):
            pass
        assert task is not None and task.finished
        return task

    def _read(self, provider: str, task_id: str) -> Task | None:
        raw = self.redis.hgetall(self.keys.task(provider, task_id))
        fields = {_text(name): _text(value) for name, value in raw.items()}
        # A hash with only a stored cancel request belongs to a task not registered yet.
        if not fields.get("status"):
            return None
        return _task_from_fields(provider, fields)

    # -- cancel -------------------------------------------------------------------

    def cancel(self, provider: str, task_id: str, *, user: str = ADMIN, reason: str = "", wait: float = 5.0) -> Task | None:
        """Store a cancel request in the task's hash, announce it, and return the state it led to.

        `user` is the user who requests it, and only the task's own user or ADMIN may. A
        pending task becomes `cancelled`, a running one `cancelling` until its worker
        has stopped it (follow it with `wait`). Raises CancelRejected for a task that
        has ended or belongs to another user, and WaitTimeout when no supervisor applied
        the request within `wait` seconds (it stays stored and applies later). With
        `wait=0`, or for a task that is not registered yet, returns None at once.
        """
        if not user:
            raise ValueError("user must not be empty: pass the id of the user who requests the cancel, or ADMIN")
        task = self._read(provider, task_id)
        if task is not None and task.finished:
            raise CancelRejected(task_id, f"the task had already ended as {task.status}; nothing was changed")
        if task is not None and user != ADMIN and user != task.user:
            raise CancelRejected(task_id, f"user {user} may not cancel a task of user {task.user}; nothing was changed")

        task_key = self.keys.task(provider, task_id)
        request = {"cancel_request_user": user, "cancel_request_reason": reason}
        self._hset_and_publish(task_key, request, self.keys.cancel_channel(), f"{provider} {task_id}")
        if task is None or wait <= 0:
            return None

        # The supervisor deletes the request fields first whenever it applies a request.
        deadline = time.monotonic() + wait
        while self.redis.hexists(task_key, "cancel_request_user"):
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"cancel request for task '{task_id}' not applied within {wait:g} s: is a supervisor running? "
                    f"The request stays stored and applies when a supervisor reaches the task",
                    task,
                )
            time.sleep(CANCEL_POLL_SECONDS)
        task = self.get(provider, task_id)
        if task.cancel_error:
            raise CancelRejected(task_id, task.cancel_error)
        return task

    # -- provider settings --------------------------------------------------------

    def set_provider_settings(self, provider: str, settings: Mapping[str, Any]) -> None:
        """Write provider settings to `<prefix>:{<provider>}:settings` and announce the change.

        Keys are those of the config file's provider section, plus `paused` and
        `removed`. Values are stored as JSON. Only the key names are checked here: the
        supervisor checks the merged settings and keeps the running ones when they are
        invalid (shown by `taskvisor provider list`).
        """
        if not PROVIDER_ID_PATTERN.match(provider):
            raise ValueError(f"provider {provider!r} is invalid: expected 1-64 characters of A-Za-z0-9._-")
        unknown = sorted(set(settings) - set(PROVIDER_KEYS) - set(STATE_KEYS))
        if unknown:
            allowed = ", ".join(PROVIDER_KEYS + STATE_KEYS)
            raise ValueError(f"unknown provider setting {', '.join(unknown)}: allowed are {allowed}")
        if not settings:
            return
        encoded = {name: orjson.dumps(value).decode() for name, value in settings.items()}
        self._hset_and_publish(settings_key(self.keys, provider), encoded, config_channel(self.keys), provider)

    def _hset_and_publish(self, key: str, mapping: Mapping[str, str], channel: str, message: str) -> None:
        """Write `mapping` into the hash `key`, then announce it on `channel`."""
        if is_cluster(self.redis):
            # A cluster pipeline cannot send PUBLISH.
            self.redis.hset(key, mapping=mapping)
            self.redis.publish(channel, message)
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=mapping)
        pipe.publish(channel, message)
        pipe.execute()


def _timeout_text(timeout: float | str) -> str:
    """Write a timeout in the plain decimal notation that the contract requires (no exponent)."""
    if isinstance(timeout, str):
        return timeout
    if isinstance(timeout, bool):
        raise InvalidTask("timeout", f"field 'timeout' has invalid value {timeout!r}: expected a number of seconds")
    return f"{float(timeout):.6f}".rstrip("0").rstrip(".")


def _status(text: str) -> str:
    try:
        return TaskStatus(text)
    except ValueError:
        return text


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text else None


def _task_from_fields(provider: str, fields: dict[str, str]) -> Task:
    return Task(
        id=fields.get("id", ""),
        provider=fields.get("provider", provider),
        type=fields.get("type", ""),
        instance=fields.get("instance", ""),
        user=fields.get("user", ""),
        status=_status(fields["status"]),
        progress=float(fields.get("progress") or 0),
        message=fields.get("message", ""),
        error=fields.get("error", ""),
        data=fields.get("data", ""),
        result=fields.get("result", ""),
        timeout=_float_or_none(fields.get("timeout")),
        attempts=int(fields.get("attempts") or 0),
        version=int(fields.get("version") or 0),
        created_at=_float_or_none(fields.get("created_at")),
        started_at=_float_or_none(fields.get("started_at")),
        completed_at=_float_or_none(fields.get("completed_at")),
        updated_at=_float_or_none(fields.get("updated_at")),
        cancelled_by=fields.get("cancelled_by", ""),
        cancel_reason=fields.get("cancel_reason", ""),
        cancel_error=fields.get("cancel_error", ""),
        fields=fields,
    )
