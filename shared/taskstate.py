"""Atomic task state changes in Redis, through the Lua scripts in `shared/lua/`.

Every change of a task's status goes through one of these methods. Each runs one
script, which checks the move against the transition table from `shared/states.py`,
updates the task hash and the instance hash, and appends the new state to the
provider's event stream in the same atomic step. The SQL mirror follows that stream.
"""

import functools
import logging
from importlib import resources

import orjson
import redis

from shared.keys import WORKER_GROUP, Keys
from shared.redaction import Redactor
from shared.redis_client import DirectCommands, is_cluster
from shared.schema import INSTANCE_ID_PATTERN, TASK_ID_PATTERN, USER_ID_PATTERN, TaskSpec, known_task_id
from shared.states import (
    TERMINAL_STATUSES,
    TRANSITIONAL_INSTANCE_STATUSES,
    InstanceStatus,
    TaskStatus,
    TaskType,
    instance_rule_after,
    instance_rule_given_up,
    instance_rule_while_running,
    lua_transition_table,
)

log = logging.getLogger(__name__)

SCRIPT_NAMES = (
    "admit", "take", "start", "finish", "progress", "renew", "dead_letter", "cancel", "due", "release", "expire",
    "repair", "retry",
)  # fmt: skip


# Function files that a script needs besides common.lua.
SCRIPT_LIBRARIES = {
    "start": ("start_task",),
    "take": ("start_task", "take_entry"),
    "finish": ("start_task", "take_entry"),
}


# Kept per process: the supervisor builds them once, and its forked children inherit them.
@functools.cache
def _script_source(name: str) -> str:
    folder = resources.files("shared") / "lua"
    parts = [lua_transition_table(), (folder / "common.lua").read_text(encoding="utf-8")]
    for library in SCRIPT_LIBRARIES.get(name, ()):
        parts.append((folder / f"{library}.lua").read_text(encoding="utf-8"))
    parts.append((folder / f"{name}.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


def _raise_error_reply(replies: list) -> None:
    """Raise the first error reply among `replies`, if there is one."""
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class StartResult:
    """The reply of start.lua: whether the worker now owns the task, and why not.

    `outcome` "ok" and "probe" mean the worker owns the task; `attempts` then counts
    this run and `retries` the automatic retries before it.
    """

    def __init__(self, reply: list) -> None:
        self.outcome = _text(reply[0])
        self.detail = _text(reply[1]) if len(reply) > 1 else ""
        self.retries = int(_text(reply[2])) if len(reply) > 2 else 0

    @property
    def owned(self) -> bool:
        return self.outcome in ("ok", "probe")

    @property
    def attempts(self) -> int:
        return int(self.detail) if self.owned else 0


class FinishResult:
    """The reply of the finish script.

    `outcome` is "ok", "missing", "fenced" or "illegal" (with `current`, the status the
    task has). `handed_over` is the (entry id, fields) of the instance's next task when
    it was handed to the finishing worker. `taken_entry` is (entry id, fields, start result or
    None) when the script took the stream's next new entry for the worker instead.
    """

    def __init__(self, reply: list) -> None:
        self.outcome = _text(reply[0])
        self.current = ""
        self.handed_over: tuple[str, dict] | None = None
        self.taken_entry: tuple[str, dict, StartResult | None] | None = None
        if self.outcome == "taken":
            self.outcome = "ok"
            flat = reply[2]
            started = StartResult(reply[3:]) if len(reply) > 3 else None
            self.taken_entry = (_text(reply[1]), {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}, started)
        elif self.outcome == "ok" and len(reply) == 3:
            flat = reply[2]
            self.handed_over = (_text(reply[1]), {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)})
        elif len(reply) > 1:
            self.current = _text(reply[1])


class TaskState:
    """Task state operations for one Redis client and key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys, events_max_len: int, dead_max_len: int, redactor: Redactor) -> None:
        self.client = client
        self.keys = keys
        self.events_max_len = events_max_len
        self.dead_max_len = dead_max_len
        self.redactor = redactor
        self.scripts = {name: client.register_script(_script_source(name)) for name in SCRIPT_NAMES}
        # On one Redis server a script may also write the task index, which is in another
        # hash slot, so a worker reserves a task's id and registers the task in one step.
        self.one_server = not is_cluster(client)
        # The scripts run for every task (take, start, finish, admit) go this cheaper way
        # on one server; a cluster client routes them itself.
        self.direct = DirectCommands(client) if self.one_server else None

    def run_script(self, name: str, keys: list[str], args: list) -> object:
        """Run one of the scripts and return its reply; an error reply is raised."""
        return self.run_scripts([(name, keys, args)], raise_errors=True)[0]

    def run_scripts(self, calls: list[tuple[str, list[str], list]], raise_errors: bool = False) -> list:
        """Run (script name, keys, args) calls in one round trip and return their replies.

        An error reply is returned as its exception, or raised with `raise_errors`. A
        script that the server lacks (after a restart or SCRIPT FLUSH, or on a cluster
        node that became a master) is loaded, and then only its calls are run again.
        """
        replies = self._send_scripts(calls)
        missing = [index for index, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:
            for name in {calls[index][0] for index in missing}:
                self.client.script_load(self.scripts[name].script)
            again = self._send_scripts([calls[index] for index in missing])
            for index, reply in zip(missing, again, strict=True):
                replies[index] = reply
        if raise_errors:
            _raise_error_reply(replies)
        return replies

    def _send_scripts(self, calls: list[tuple[str, list[str], list]]) -> list:
        if self.direct is not None:
            return self.direct.execute(
                [("EVALSHA", self.scripts[name].sha, len(keys), *keys, *args) for name, keys, args in calls]
            )
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.evalsha(self.scripts[name].sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    def public_fields(self, spec: TaskSpec, timeout: float) -> list[str]:
        """Field/value pairs stored for a new task; `data` is redacted here."""
        data = orjson.dumps(self.redactor.redact(spec.data)).decode()
        return [
            "id", spec.id,
            "provider", spec.provider,
            "type", str(spec.type),
            "instance", spec.instance,
            "user", spec.user,
            "timeout", repr(float(timeout)),
            "data", data,
            "entry", spec.entry,
        ]  # fmt: skip

    def claim_id(self, spec: TaskSpec) -> str | None:
        """Reserve the task id for this entry across all providers.

        Returns None when the id is free or already belongs to this same entry, and
        otherwise `<provider> <entry>` of the first task that took the id.
        """
        return self._reserve_id(spec.id, spec.provider, spec.entry)

    def _reserve_id(self, task_id: str, provider: str, entry_id: str) -> str | None:
        """Reserve `task_id` for this entry, and return the other entry that reserved it first, or None."""
        owner = f"{provider} {entry_id}"
        index = self.keys.task_index()
        if self.client.hsetnx(index, task_id, owner):
            return None
        current = _text(self.client.hget(index, task_id) or b"")
        if current in ("", owner):
            return None
        return current

    def claim_ids(self, specs: list[TaskSpec]) -> list[bool]:
        """Reserve many task ids in two round trips; True where the id belongs to that entry."""
        if not specs:
            return []
        index = self.keys.task_index()
        claimed = [bool(reply) for reply in self._commands([
            ("HSETNX", index, spec.id, f"{spec.provider} {spec.entry}") for spec in specs
        ])]  # fmt: skip
        taken = [position for position, ok in enumerate(claimed) if not ok]
        if taken:
            owners = self._commands([("HGET", index, specs[position].id) for position in taken])
            for position, owner in zip(taken, owners, strict=True):
                spec = specs[position]
                claimed[position] = _text(owner or b"") in ("", f"{spec.provider} {spec.entry}")
        return claimed

    def _commands(self, commands: list[tuple]) -> list:
        """Send plain commands in one round trip and return their replies; an error reply is raised."""
        if self.direct is None:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute()
        replies = self.direct.execute(commands)
        _raise_error_reply(replies)
        return replies

    def _admit_call(self, spec: TaskSpec, timeout: float) -> tuple[str, list[str], list]:
        keys = [self.keys.task(spec.provider, spec.id), self.keys.events(spec.provider)]
        return "admit", keys, [self.events_max_len, *self.public_fields(spec, timeout)]

    def admit(self, spec: TaskSpec, timeout: float) -> object:
        """Register the task as pending unless it exists."""
        return self.run_script(*self._admit_call(spec, timeout))

    def admit_many(self, admitted: list[tuple[TaskSpec, float]]) -> list:
        """Register each (task, timeout) as pending unless it exists, in one round trip (used by the intake).

        Returns the admit script's replies in order, an error reply as its exception.
        """
        return self.run_scripts([self._admit_call(spec, timeout) for spec, timeout in admitted])

    def take(
        self, provider: str, consumer: str, start_arguments: list[str] | None = None
    ) -> tuple[str, dict, StartResult | None] | str:
        """Deliver the next new entry to `consumer`, queueing it behind its instance's earlier ones.

        With `start_arguments` (from `start_arguments`), a registered task is also started
        in the same step. Returns (entry id, fields, the start's result or None), or the
        id of the newest entry when there is nothing new.
        """
        reply = self.run_script(
            "take",
            [self.keys.tasks(provider)],
            [WORKER_GROUP, consumer, self.keys.instance_queue_prefix(provider), *(start_arguments or ())],
        )
        if _text(reply[0]) == "none":
            return _text(reply[1])
        flat = reply[2]
        fields = {flat[index]: flat[index + 1] for index in range(0, len(flat), 2)}
        started = StartResult(reply[3:]) if len(reply) > 3 else None
        return _text(reply[1]), fields, started

    def start_arguments(
        self, provider: str, owner: str, lease_ms: int, actions: dict[str, str], poison_runs: int, limit: int
    ) -> list[str]:
        """Return the arguments that let `take` and `finish` start registered tasks (see take_entry.lua).

        `actions` maps each task type to its on-interrupt action.
        """
        task_key = self.keys.task(provider, "")
        rules = "".join(
            f";{task_type}={instance_rule_while_running(task_type)},{instance_rule_after(task_type, TaskStatus.CANCELLED)},"
            f"{instance_rule_given_up(task_type)},{actions[str(task_type)]}"
            for task_type in TaskType
        )
        return [
            task_key[: -len("task:")], provider, owner, str(lease_ms), str(self.events_max_len), str(poison_runs),
            str(limit), str(self.dead_max_len), rules,
        ]  # fmt: skip

    def _task_keys(self, spec: TaskSpec) -> list[str]:
        provider = spec.provider
        return [
            self.keys.task(provider, spec.id),
            self.keys.events(provider),
            self.keys.instances(provider),
            self.keys.lease(provider, spec.id),
            self.keys.tasks(provider),
            self.keys.instance_queue(provider, spec.instance),
            self.keys.busy(provider),
        ]

    def start(
        self,
        spec: TaskSpec,
        timeout: float,
        owner: str,
        lease_ms: int,
        registered_only: bool = False,
        on_interrupt: str = "rerun",
        poison_runs: int = 3,
        limit: int = -1,
    ) -> StartResult:
        """Try to move the task to running for `owner`.

        With `registered_only`, a task not registered yet is not created here and
        the reply is "unregistered". Otherwise a task not registered yet is created. On a
        Redis Cluster the caller must have reserved its id with `claim_id` first, and on one
        server the script reserves it (reply "duplicate" with `<provider> <entry>` of the
        task that holds the id).
        `on_interrupt` says what happens when the task's previous run was interrupted
        ("rerun", "probe" or "fail"), `poison_runs` after how many runs lost with their
        worker the task is failed as poison, and `limit` how many tasks of the provider may
        run at once across all supervisors (-1 for no limit); a limit the supervisors
        wrote to Redis replaces it.
        """
        running_rule = instance_rule_while_running(spec.type)
        cancel_rule = instance_rule_after(spec.type, TaskStatus.CANCELLED)
        given_up_rule = instance_rule_given_up(spec.type)
        keys = [*self._task_keys(spec), self.keys.dead(spec.provider), self.keys.limit(spec.provider)]
        if self.one_server and not registered_only:
            keys.append(self.keys.task_index())
        reply = self.run_script(
            "start",
            keys,
            [self.events_max_len, owner, lease_ms, running_rule, cancel_rule, WORKER_GROUP, spec.entry,
                  "registered" if registered_only else "", on_interrupt, poison_runs, limit, given_up_rule,
                  self.dead_max_len, *self.public_fields(spec, timeout)],
        )  # fmt: skip
        return StartResult(reply)

    def finish(
        self,
        spec: TaskSpec,
        owner: str,
        status: TaskStatus,
        fields: dict[str, str],
        handoff_consumer: str = "",
        retry_due_ms: int | None = None,
        instance_rule: str | None = None,
        start_arguments: list[str] | None = None,
    ) -> FinishResult:
        """Move an owned task to `status`, and hand the instance's next task to `handoff_consumer`.

        With `retry_due_ms` (a Unix time in milliseconds) the task goes back to pending
        and is scheduled for an automatic retry then. `instance_rule` replaces the
        instance rule of `status` for this task type. With `start_arguments` (from
        `start_arguments`) and no task of the instance to hand over, the stream's next new
        entry is taken for `handoff_consumer` and its task started, as `take` does.
        """
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, value]
        rule = instance_rule or instance_rule_after(spec.type, status)
        cancel_rule = instance_rule_after(spec.type, TaskStatus.CANCELLED)
        take = [self.keys.instance_queue_prefix(spec.provider), *start_arguments] if start_arguments else []
        reply = self.run_script(
            "finish",
            [*self._task_keys(spec), self.keys.retries(spec.provider)],
            [self.events_max_len, owner, str(status), rule, cancel_rule, WORKER_GROUP, spec.entry,
                  handoff_consumer, "" if retry_due_ms is None else str(retry_due_ms), len(take), *take, *pairs],
        )  # fmt: skip
        result = FinishResult(reply)
        if result.outcome != "ok":
            log.warning(
                "state change rejected task_id=%s provider=%s to=%s reason=%s current=%s owner=%s",
                spec.id, spec.provider, status, result.outcome, result.current, owner,
            )  # fmt: skip
        return result

    def cancel(self, provider: str, task_id: str, user: str = "", reason: str = "", stored: bool = False) -> list[str]:
        """Apply a cancel request (see cancel.lua for the replies); `user` '' means an administrator."""
        reply = self.scripts["cancel"](
            keys=[self.keys.task(provider, task_id), self.keys.events(provider), self.keys.tasks(provider)],
            args=[self.events_max_len, WORKER_GROUP, self.keys.instance_queue_prefix(provider), user, reason,
                  "stored" if stored else ""],
        )  # fmt: skip
        return [_text(item) for item in reply]

    def report_progress(self, spec: TaskSpec, owner: str, percent: float, message: str, lease_ms: int) -> bool:
        provider = spec.provider
        return bool(
            self.scripts["progress"](
                keys=[self.keys.task(provider, spec.id), self.keys.events(provider), self.keys.lease(provider, spec.id)],
                args=[self.events_max_len, owner, f"{percent:g}", message, lease_ms],
            )
        )

    def renew_lease(self, spec: TaskSpec, owner: str, consumer: str, lease_ms: int) -> bool:
        """Extend the task's lease; False when this owner no longer holds it."""
        keys = [self.keys.lease(spec.provider, spec.id), self.keys.tasks(spec.provider)]
        return bool(self.scripts["renew"](keys=keys, args=[owner, lease_ms, WORKER_GROUP, consumer, spec.entry]))

    def claim_abandoned(self, provider: str, consumer: str, lease_ms: int) -> int:
        """Take over entries that no worker has touched for a whole lease; returns how many.

        A running task's worker renews its entry with every lease renewal, so an entry
        idle for longer belongs to a worker that died or to a consumer name no longer
        in use. The start script still refuses a task whose lease is alive.
        """
        reply = self.client.xautoclaim(
            self.keys.tasks(provider), WORKER_GROUP, consumer, min_idle_time=lease_ms, start_id="0-0", count=20, justid=True
        )
        return len(reply[1]) if reply and len(reply) > 1 else 0

    def dead_letter(self, provider: str, entry_id: str, fields: dict, reason: str, record_task: bool = False) -> None:
        """Move an invalid entry to the dead-letter stream with its fields redacted.

        With `record_task`, a task id that can be read from the entry and is still free
        is registered as a failed task whose error is the reason. A duplicate id is never
        recorded, because the id belongs to the first task.
        """
        readable = {_text(name): _text(value) for name, value in fields.items()}
        for name in list(readable):
            if self.redactor.is_secret(name):
                readable[name] = "***"
        if "data" in readable:
            try:
                readable["data"] = orjson.dumps(self.redactor.redact(orjson.loads(readable["data"]))).decode()
            except orjson.JSONDecodeError:
                # Secret fields cannot be found in broken JSON, so none of it is kept.
                readable["data"] = "(not valid JSON, not shown)"
        instance = readable.get("instance", "")
        task_id = known_task_id(provider, entry_id, fields) if record_task else None
        task_pairs: list[str] = []
        if task_id is not None and self._reserve_id(task_id, provider, entry_id) is None:
            task_pairs = [
                "id", task_id, "provider", provider, "entry", entry_id, "timeout", "0", "data", "{}",
                *_readable_pairs(readable, {"type": TASK_ID_PATTERN, "instance": INSTANCE_ID_PATTERN,
                                            "user": USER_ID_PATTERN}),
            ]  # fmt: skip
        else:
            task_id = None
        self.scripts["dead_letter"](
            keys=[
                self.keys.dead(provider), self.keys.tasks(provider), self.keys.instance_queue(provider, instance),
                self.keys.task(provider, task_id or "-"), self.keys.events(provider),
            ],
            args=[self.dead_max_len, WORKER_GROUP, entry_id, reason, orjson.dumps(readable).decode(),
                  self.events_max_len, *task_pairs],
        )  # fmt: skip
        log.warning(
            "entry rejected provider=%s entry=%s task_id=%s reason=%s", provider, entry_id, task_id or "-", reason
        )

    def take_due_retry(self, provider: str, consumer: str) -> tuple[str, dict] | float | None:
        """Claim the first due automatic retry for `consumer`.

        Returns (entry id, fields), or the Unix time in seconds when the next retry is
        due, or None when no retry waits.
        """
        reply = self.scripts["due"](keys=[self.keys.retries(provider), self.keys.tasks(provider)], args=[WORKER_GROUP, consumer])
        kind = _text(reply[0])
        if kind == "entry":
            flat = reply[2]
            return _text(reply[1]), {flat[index]: flat[index + 1] for index in range(0, len(flat), 2)}
        if kind == "gone":
            return 0.0
        due = _text(reply[1]) if len(reply) > 1 else ""
        return float(due) / 1000 if due else None

    def release_owner(self, provider: str, owner: str) -> str:
        """Release the lease and busy entry of a worker known to be dead; returns the task id released."""
        reply = self.scripts["release"](keys=[self.keys.busy(provider)], args=[owner, self.keys.lease(provider, "")])
        return _text(reply)

    def expire_overdue(self, provider: str, task_id: str, task_type: str, instance: str, slack: float) -> list[str]:
        """End a task still running `slack` seconds past its timeout; see expire.lua for the reply."""
        keys = [
            self.keys.task(provider, task_id), self.keys.events(provider), self.keys.instances(provider),
            self.keys.lease(provider, task_id), self.keys.tasks(provider), self.keys.instance_queue(provider, instance),
            self.keys.busy(provider),
        ]  # fmt: skip
        rules = [instance_rule_after(task_type, TaskStatus.TIMEOUT), instance_rule_after(task_type, TaskStatus.CANCELLED)]
        reply = self.scripts["expire"](keys=keys, args=[self.events_max_len, WORKER_GROUP, f"{slack:.3f}", *rules])
        return [_text(item) for item in reply]

    def repair_instance(self, provider: str, instance: str) -> str:
        """Set an instance stuck in a transitional status with no unfinished task to `error`.

        Returns the status it had, or '' when it needed no repair.
        """
        keys = [
            self.keys.instances(provider), self.keys.events(provider), self.keys.tasks(provider),
            self.keys.instance_queue(provider, instance),
        ]  # fmt: skip
        args = [self.events_max_len, provider, instance, str(InstanceStatus.ERROR), *sorted(TRANSITIONAL_INSTANCE_STATUSES)]
        return _text(self.scripts["repair"](keys=keys, args=args))

    def retry(self, provider: str, task_id: str, requested_by: str, entry_fields: dict[str, str]) -> list[str]:
        """Put an ended task back in line as a new stream entry; see retry.lua for the reply."""
        pairs: list[str] = []
        for name, value in entry_fields.items():
            pairs += [name, value]
        keys = [self.keys.task(provider, task_id), self.keys.events(provider), self.keys.tasks(provider)]
        reply = self.scripts["retry"](keys=keys, args=[self.events_max_len, requested_by, *pairs])
        result = [_text(item) for item in reply]
        if result[0] == "ok":
            self.client.hset(self.keys.task_index(), task_id, f"{provider} {result[1]}")
        return result

    def read(self, provider: str, task_id: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.task(provider, task_id))
        return {_text(name): _text(value) for name, value in raw.items()}

    def locate(self, task_id: str) -> str | None:
        """Return the provider of a task id, or None when no provider has it."""
        value = self.client.hget(self.keys.task_index(), task_id)
        if not value:
            return None
        return _text(value).split(" ", 1)[0]


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def _readable_pairs(readable: dict[str, str], patterns: dict) -> list[str]:
    """Field/value pairs of a rejected entry's fields that match their pattern; others empty."""
    pairs: list[str] = []
    for name, pattern in patterns.items():
        value = readable.get(name, "")
        pairs += [name, value if pattern.match(value) else ""]
    return pairs
