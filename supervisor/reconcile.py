"""The reconciliation pass: repairs what crashes and lost writes can leave behind.

Every `taskPollInterval` seconds (when `enableTaskPolling` is on) the intake process
runs one pass per provider. A pass:

- releases the leases of this supervisor's workers whose process is gone, so that
  their tasks are taken over at once (a supervisor restarted after SIGKILL finds its
  old workers' leases still alive otherwise);
- hands the entries of consumer names that no worker will use again to a live worker;
- ends tasks still running long past their timeout, and stops their worker;
- sets instances left in a transitional status (creating, starting, ...) with no
  unfinished task to `error`;
- with `supervisor.retention` set, deletes finished tasks that ended longer ago than
  that, a bounded batch per pass (see supervisor/retention.py).

Each step is one Lua script per task or instance, so a pass that races with a worker
changes nothing the worker owns.
"""

import logging
import os
import signal
import time

import psutil
import redis

from shared.keys import PROVIDER_ID_PATTERN, Keys
from shared.process import process_alive
from shared.provider_settings import providers_set_key
from shared.redis_client import text as _text
from shared.settings import Config
from shared.states import TRANSITIONAL_INSTANCE_STATUSES
from shared.taskstate import TaskState
from supervisor.recovery import reassign_orphans
from supervisor.retention import RetentionPurge
from supervisor.status import read_statuses
from worker.main import consumer_name

log = logging.getLogger(__name__)

# Seconds between two looks for task streams of providers that no supervisor runs, and
# the age after which their entries are rejected: long enough for an operator to add a
# provider that the panel started to use a little early.
UNKNOWN_CHECK_SECONDS = 60.0
UNKNOWN_PROVIDER_GRACE_SECONDS = 300.0

# Seconds a task may run past its timeout and kill grace before the pass ends it. The
# worker itself ends a timed-out task within its kill grace and two seconds more.
OVERDUE_MARGIN_SECONDS = 5.0


def owner_pid(owner: str) -> int | None:
    """Return the process id in an owner name `<consumer>:<pid>`, or None."""
    _consumer, _, pid = owner.rpartition(":")
    return int(pid) if pid.isdigit() else None


def is_local_owner(owner: str, supervisor_name: str, provider: str) -> bool:
    return owner.startswith(f"{supervisor_name}-{provider}-")


def release_dead_local_owners(state: TaskState, keys: Keys, supervisor_name: str, provider: str) -> list[str]:
    """Release the busy entries and leases of this supervisor's workers that no longer run."""
    released = []
    for owner_bytes in state.client.hkeys(keys.busy(provider)):
        owner = _text(owner_bytes)
        pid = owner_pid(owner)
        if not is_local_owner(owner, supervisor_name, provider) or pid is None or process_alive(pid):
            continue
        task_id = state.release_owner(provider, owner)
        released.append(task_id)
        if task_id:
            log.warning("lease of a dead worker released task_id=%s provider=%s owner=%s", task_id, provider, owner)
    return released


class Reconciler:
    def __init__(self, config: Config, state: TaskState) -> None:
        self.config = config
        self.state = state
        self.keys = state.keys
        self.next_pass: dict[str, float] = {}
        self.next_unknown_check = time.monotonic() + UNKNOWN_CHECK_SECONDS
        self.retention = RetentionPurge(config, state.client, self.keys) if config.supervisor.retention > 0 else None

    def run_due(self, providers: dict) -> None:
        """Run a pass for each provider whose interval has passed."""
        now = time.monotonic()
        if now >= self.next_unknown_check:
            self.next_unknown_check = now + UNKNOWN_CHECK_SECONDS
            try:
                self.reject_unknown_provider_entries(providers)
            except redis.ResponseError as exc:
                log.warning("check of unknown providers' streams failed error=%s", exc)
        for provider, settings in providers.items():
            if not settings.enable_task_polling:
                continue
            due = self.next_pass.get(provider)
            if due is None:
                # The first pass runs soon after start, when a restart's leftovers are fresh.
                self.next_pass[provider] = now + min(settings.task_poll_interval, 2.0)
                continue
            if now < due:
                continue
            self.next_pass[provider] = now + settings.task_poll_interval
            try:
                self.run_pass(provider, settings)
            except redis.ResponseError as exc:
                log.warning("reconciliation pass failed provider=%s error=%s", provider, exc)

    def run_pass(self, provider: str, settings) -> dict[str, int]:
        """One pass over a provider; returns how many things each step changed."""
        name = self.config.supervisor.name
        counts = {
            "released": len(release_dead_local_owners(self.state, self.keys, name, provider)),
            "reassigned": reassign_orphans(self.state.client, self.keys, name, provider, settings.group_size),
            "claimed": 0,
            "expired": self.expire_overdue(provider, settings),
            "repaired": self.repair_instances(provider),
            "purged": self.retention.run() if self.retention is not None else 0,
        }
        if settings.group_size > 0:
            counts["claimed"] = self.state.claim_abandoned(
                provider, consumer_name(name, provider, 0), int(self.config.supervisor.lease_seconds * 1000)
            )
        changed = {step: count for step, count in counts.items() if count}
        if changed:
            log.info(
                "reconciliation pass provider=%s %s", provider, " ".join(f"{step}={count}" for step, count in changed.items())
            )
        return counts

    def expire_overdue(self, provider: str, settings) -> int:
        slack = settings.driver.kill_grace + self.config.supervisor.lease_seconds + OVERDUE_MARGIN_SECONDS
        now = time.time()
        expired = 0
        busy = self.state.client.hgetall(self.keys.busy(provider))
        for owner_bytes, value in busy.items():
            owner = _text(owner_bytes)
            task_id, _, started_text = _text(value).partition(" ")
            task = self.state.read(provider, task_id)
            try:
                started = float(task.get("started_at") or started_text)
                timeout = float(task.get("timeout") or 0)
            except ValueError:
                continue
            if not timeout or started + timeout + slack > now:
                continue
            reply = self.state.expire_overdue(provider, task_id, task.get("type", ""), task.get("instance", ""), slack)
            if reply[0] != "expired":
                continue
            expired += 1
            log.error(
                "overdue task ended task_id=%s provider=%s owner=%s timeout=%ss; its worker did not end it",
                task_id, provider, owner, task.get("timeout"),
            )  # fmt: skip
            self.stop_stuck_worker(provider, owner)
        return expired

    def stop_stuck_worker(self, provider: str, owner: str) -> None:
        """Kill a local worker that kept a task past its timeout; the supervisor replaces it."""
        pid = owner_pid(owner)
        if pid is None or not is_local_owner(owner, self.config.supervisor.name, provider) or pid == os.getpid():
            return
        try:
            process = psutil.Process(pid)
            if process.ppid() != os.getppid():
                return
            os.kill(pid, signal.SIGKILL)
            log.error("worker killed after an overdue task provider=%s pid=%d", provider, pid)
        except (psutil.Error, ProcessLookupError):
            return

    def repair_instances(self, provider: str) -> int:
        repaired = 0
        transitional = {str(status) for status in TRANSITIONAL_INSTANCE_STATUSES}
        for instance_bytes, status_bytes in self.state.client.hscan_iter(self.keys.instances(provider), count=500):
            if _text(status_bytes) not in transitional:
                continue
            instance = _text(instance_bytes)
            before = self.state.repair_instance(provider, instance)
            if before:
                repaired += 1
                log.warning(
                    "instance status repaired provider=%s instance=%s was=%s now=error; it had no unfinished task",
                    provider, instance, before,
                )  # fmt: skip
        return repaired

    def reject_unknown_provider_entries(self, providers: dict) -> int:
        """Dead-letter entries that waited too long in the stream of a provider that no supervisor runs.

        A provider counts as known when this supervisor's config has it, any running
        supervisor lists it in its status key, or it is in the Redis providers set.
        Returns how many entries were rejected.
        """
        known = set(providers)
        for status in read_statuses(self.state.client, self.keys):
            known |= set(status.get("providers", {}))
        known |= {_text(member) for member in self.state.client.smembers(providers_set_key(self.keys))}
        cutoff_ms = int((time.time() - UNKNOWN_PROVIDER_GRACE_SECONDS) * 1000)
        rejected = 0
        for name in self.state.client.scan_iter(match=f"{self.keys.prefix}:{{*}}:tasks", count=1000):
            stream = _text(name)
            provider = self.keys.provider_from_task_key(stream)
            if provider in known or not PROVIDER_ID_PATTERN.match(provider):
                continue
            for entry_bytes, fields in self.state.client.xrange(stream, max=f"{cutoff_ms}", count=200):
                entry_id = _text(entry_bytes)
                reason = (
                    f"unknown provider '{provider}': no running supervisor has it; add it to the config or with "
                    f"'taskvisor provider add', then push the task again"
                )
                self.state.dead_letter(provider, entry_id, fields, reason, record_task=True)
                rejected += 1
        return rejected
