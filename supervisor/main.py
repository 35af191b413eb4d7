"""The supervisor: the parent process that forks and watches every other process.

It forks one group of workers per provider, plus an intake process (makes new tasks
visible as pending), a mirror process (copies state changes into SQL) and, unless
`health.enabled` is false, a monitor process (the HTTP health endpoint). The
supervisor itself stays single-threaded and never runs a task: its loop waits for a
signal or a one-second tick, then runs named steps. Signal handlers only record the
signal; the loop acts on it.
"""

import logging
import os
import select
import signal
import time

import msgspec
import redis

from shared.errors import StoreError, TaskvisorError
from shared.heartbeat import HeartbeatTable
from shared.keys import WORKER_GROUP, Keys
from shared.redaction import Redactor, redact_url
from shared.redis_client import connect, ensure_group
from shared.settings import Config
from shared.store import open_store
from shared.taskstate import TaskState
from supervisor.checks import warn_about_commands, warn_about_unknown_streams
from supervisor.children import Child, ChildKey, Children
from supervisor.health_server import monitor_main
from supervisor.intake import intake_main
from supervisor.live_config import ConfigWatcher
from supervisor.mirror import mirror_main
from supervisor.reconcile import release_dead_local_owners
from supervisor.recovery import reassign_orphans
from supervisor.status import claim_name, publish_status, status_key
from worker.drivers.reaping import enable_child_subreaper
from worker.main import consumer_name, worker_main

log = logging.getLogger(__name__)

# Maximum wait of the loop. A config notice published on Redis is read at the next
# tick, so this bounds how long a live change (a resize, a pause) waits.
TICK_SECONDS = 0.25
# Seconds between two writes of the status record (it expires after 5 s).
STATUS_INTERVAL_SECONDS = 1.0
# Seconds that a worker gets after SIGUSR1 (abort the task) before SIGKILL.
ABORT_MARGIN_SECONDS = 5.0
SERVICE_STOP_SECONDS = 10.0
# Minimum seconds between two identical "redis unavailable" warnings of the loop.
REDIS_WARNING_INTERVAL = 30.0


class Supervisor:
    def __init__(self, config: Config, watcher: ConfigWatcher | None = None) -> None:
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self.pid = os.getpid()
        self.signals: list[int] = []
        self.stopping = False
        self.cold_stop = False
        self.watcher = watcher or ConfigWatcher(None, None, None)
        self.started_at = time.time()
        # Distinguishes this supervisor's status record from one that another supervisor wrote.
        self.token = os.urandom(8).hex()
        # Whether a status write that replaced another supervisor's record was logged. A write
        # that replaces none clears it.
        self.name_clash_logged = False
        self.next_status = 0.0
        self.published_children: tuple = ()
        # The last config with changes outside providers that was reported as needing a restart.
        self.pending_restart_config: Config | None = None
        self.last_redis_warning = 0.0
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self.wakeup_write, False)
        # Created before the first fork, so that every child shares it.
        self.heartbeats = HeartbeatTable(exit_record_seconds=max(60.0, config.health.heartbeat_timeout))
        self.children = Children(self.pid, self._close_in_child, self.heartbeats)

    def _close_in_child(self) -> None:
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)

    # -- start -------------------------------------------------------------------

    def prepare(self) -> None:
        """Check Redis and the database, create the schema and the consumer groups."""
        config = self.config
        try:
            # A cluster client reads the slot map when it is created, so connect() may raise too.
            self.client = connect(config.redis.url)
            self.client.ping()
        except redis.RedisError as exc:
            raise TaskvisorError(
                f"cannot reach Redis at {redact_url(config.redis.url)}: {exc}; start Redis or pass --redis-url"
            ) from None
        loaded = self.watcher.load(self.client, config)
        if loaded is not None:
            self.config = config = loaded
        try:
            claim_name(self.client, self.keys, config, self.children, self.started_at, self.token)
        except redis.RedisError as exc:
            raise TaskvisorError(
                f"failed to write the supervisor's status record in Redis at {redact_url(config.redis.url)}: {exc};"
                " check that this Redis accepts writes (a master, not a replica, with memory left)"
            ) from None
        self.state = TaskState(
            self.client, self.keys, config.redis.events_max_len, config.redis.dead_max_len, Redactor(config.secret_fields)
        )
        try:
            store = open_store(config.database.url, config.base_dir)
            store.init_schema()
            store.close()
        except StoreError as exc:
            if not config.database.url.startswith("mysql"):
                raise
            # Workers never touch SQL: tasks run and their states wait in Redis, and the
            # mirror creates the tables once the server is back.
            log.warning("database unavailable at start; tasks run and their states wait in redis error=%s", exc)
        for provider, settings in config.providers.items():
            self.prepare_provider(provider, settings.group_size)
        warn_about_commands(config)
        warn_about_unknown_streams(self.client, self.keys, config)

    def prepare_provider(self, provider: str, group_size: int) -> None:
        if group_size == 0:
            log.warning("provider has no workers (paused or maxConcurrentTasks: 0); its tasks wait provider=%s", provider)
        ensure_group(self.client, self.keys.tasks(provider), WORKER_GROUP)
        reassign_orphans(self.client, self.keys, self.config.supervisor.name, provider, group_size)
        # Workers of an earlier run of this supervisor (killed with it) hold leases that
        # would otherwise delay the takeover of their tasks until they run out.
        release_dead_local_owners(self.state, self.keys, self.config.supervisor.name, provider)

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wakeup_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    # -- main loop -----------------------------------------------------------------

    def run(self) -> int:
        self.prepare()
        enable_child_subreaper()
        self.install_signals()
        log.info(
            "supervisor started name=%s providers=%d redis=%s database=%s pid=%d",
            self.config.supervisor.name, len(self.config.providers),
            redact_url(self.config.redis.url), redact_url(self.config.database.url), os.getpid(),
        )  # fmt: skip
        while not self.stopping:
            self.heartbeats.beat_supervisor(self.stopping)
            self.reconcile_children()
            self.wait_for_wakeup(TICK_SECONDS)
            self.handle_signals()
            self.reap_children()
            self.children.kill_orphans()
            # Workers that kill_orphans reaped get their leases released now, not a tick later.
            self.reap_children()
            self.apply_config_changes()
            self.publish_status()
        self.shutdown()
        return 0

    def wait_for_wakeup(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self.wakeup_read], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self.wakeup_read, 4096):
                    pass
            except BlockingIOError:
                pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.stopping:
                    self.cold_stop = True
                self.stopping = True
                self.children.stopping = True
                log.info("signal received signal=%s; stopping", signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                log.info("SIGHUP received; reloading the configuration")
                self.watcher.request_reload()

    # -- children ------------------------------------------------------------------

    def wanted_children(self) -> list[ChildKey]:
        wanted: list[ChildKey] = [("intake", "", 0), ("mirror", "", 0)]
        if self.config.health.enabled:
            wanted.append(("monitor", "", 0))
        for provider, settings in self.config.providers.items():
            wanted += [("worker", provider, slot) for slot in range(settings.group_size)]
        return wanted

    def reconcile_children(self) -> None:
        def retire_reason(child: Child) -> str:
            return "resize" if child.provider in self.config.providers else "remove"

        self.children.reconcile(self.wanted_children(), self.start_child, retire_reason)

    def start_child(self, key: ChildKey) -> None:
        role, provider, slot = key
        if role == "worker":
            self.children.fork(key, lambda: worker_main(self.config, provider, slot), f"worker:{provider}:{slot}")
        elif role == "intake":
            self.children.fork(key, lambda: intake_main(self.config), "intake")
        elif role == "monitor":
            self.children.fork(key, lambda: monitor_main(self.config, self.heartbeats), "monitor")
        else:
            self.children.fork(key, lambda: mirror_main(self.config), "mirror")

    def reap_children(self) -> None:
        self.children.reap()
        ended = self.children.take_exited()
        owners = [
            f"{consumer_name(self.config.supervisor.name, child.provider, child.slot)}:{child.pid}"
            for child in ended
            if child.role == "worker"
        ]
        if not owners:
            return
        # A dead worker's task is taken over at once by the next worker of its slot,
        # instead of after its lease runs out.
        try:
            for child, owner in zip([c for c in ended if c.role == "worker"], owners, strict=True):
                task_id = self.state.release_owner(child.provider, owner)
                if task_id:
                    log.warning(
                        "worker died while running a task task_id=%s provider=%s pid=%d; it is taken over",
                        task_id, child.provider, child.pid,
                    )  # fmt: skip
        except redis.RedisError as exc:
            self.warn_redis("leases of dead workers not released", exc)

    # -- live configuration ----------------------------------------------------------

    def apply_config_changes(self) -> None:
        try:
            new = self.watcher.poll(self.client, self.config)
        except redis.RedisError as exc:
            self.watcher.reset_connection()
            self.warn_redis("provider settings not read", exc)
            return
        if new is None:
            return
        old = self.config
        # Only provider settings change at run time; the rest needs a restart.
        outside = msgspec.structs.replace(new, providers=old.providers)
        if outside != old and outside != self.pending_restart_config:
            self.pending_restart_config = outside
            log.warning("config keys outside providers changed; they apply after a restart of the supervisor")
        new = msgspec.structs.replace(old, providers=new.providers)
        for provider in sorted(set(old.providers) - set(new.providers)):
            log.info("provider removed; its workers finish their tasks and stop provider=%s", provider)
        for provider in sorted(set(new.providers) - set(old.providers)):
            log.info("provider added provider=%s workers=%d", provider, new.providers[provider].group_size)
            self.prepare_provider(provider, new.providers[provider].group_size)
        for provider in sorted(set(old.providers) & set(new.providers)):
            self.log_provider_change(provider, old.providers[provider], new.providers[provider])
        self.config = new
        restart_services = set(old.providers) != set(new.providers)
        for child in list(self.children.by_pid.values()):
            changed = child.provider in new.providers and _needs_restart(old, new, child.provider)
            if (child.role == "worker" and changed) or (child.role != "worker" and restart_services):
                if not child.retiring or child.retiring == "resize":
                    self.children.retire(child, "restart")
        self.reconcile_children()
        # The new limits go to Redis at once: workers refuse to start tasks above the old one.
        self.publish_status(force=True)

    def log_provider_change(self, provider: str, old, new) -> None:
        if old.group_size != new.group_size:
            log.info("provider resized provider=%s workers=%d->%d paused=%s", provider, old.group_size, new.group_size, new.paused)
        if _needs_restart_settings(old, new):
            log.info("provider settings changed; its workers restart after their current task provider=%s", provider)

    def publish_status(self, force: bool = False) -> None:
        now = time.monotonic()
        # A child forked, exited or began to retire: the record shows it without waiting.
        children = tuple(sorted((child.pid, child.retiring) for child in self.children.by_pid.values()))
        if not force and now < self.next_status and children == self.published_children:
            return
        self.next_status = now + STATUS_INTERVAL_SECONDS
        self.published_children = children
        try:
            replaced = publish_status(
                self.client, self.keys, self.config, self.children, self.started_at, self.watcher.errors, self.token
            )
        except redis.RedisError as exc:
            self.warn_redis("status not published", exc)
            return
        if replaced is not None and not self.name_clash_logged:
            # Another supervisor with this name started while this one's record was
            # missing (Redis unreachable for longer than the record lives).
            self.name_clash_logged = True
            log.error(
                "another supervisor uses this supervisor's name: its workers share consumer names with this"
                " one's, and a task could run twice; stop one of them and give each its own supervisor.name"
                " name=%s other_pid=%s other_host=%s", self.config.supervisor.name, replaced.get("pid", "?"),
                replaced.get("host") or "unknown",
            )  # fmt: skip
        elif replaced is None:
            self.name_clash_logged = False

    def warn_redis(self, what: str, exc: Exception) -> None:
        if time.monotonic() - self.last_redis_warning >= REDIS_WARNING_INTERVAL:
            self.last_redis_warning = time.monotonic()
            log.warning("redis unavailable in supervisor: %s error=%s", what, exc)

    # -- shutdown --------------------------------------------------------------------

    def wait_for_children(self, role: str | None, deadline: float, until_cold_stop: bool = False) -> bool:
        """Reap until no child of `role` is left or the deadline passes; True when none is left.

        With `until_cold_stop`, a second SIGTERM or Ctrl-C also ends the wait.
        """
        while True:
            self.heartbeats.beat_supervisor(self.stopping)
            self.reap_children()
            if self.children.count(role) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            self.wait_for_wakeup(0.1)
            self.handle_signals()
            if until_cold_stop and self.cold_stop:
                log.info("second stop signal; not waiting for running tasks to finish")
                return False

    def shutdown(self) -> None:
        grace = self.config.supervisor.shutdown_grace
        log.info("stopping workers count=%d grace=%.0fs", self.children.count("worker"), grace)
        self.children.signal_all("worker", signal.SIGTERM)
        if not self.wait_for_children("worker", time.monotonic() + grace, until_cold_stop=True):
            if self.cold_stop:
                log.warning("stopping running tasks now and returning them to pending")
            else:
                log.warning("grace period over; stopping running tasks and returning them to pending")
            self.children.signal_all("worker", signal.SIGUSR1)
            kill_grace = max((p.driver.kill_grace for p in self.config.providers.values()), default=5.0)
            if not self.wait_for_children("worker", time.monotonic() + kill_grace + ABORT_MARGIN_SECONDS):
                log.error("workers did not stop; sending SIGKILL")
                self.children.signal_all("worker", signal.SIGKILL)
                self.wait_for_children("worker", time.monotonic() + 5)
        log.info("workers stopped")

        log.info("stopping intake, mirror and monitor")
        self.children.signal_all(None, signal.SIGTERM)
        if not self.wait_for_children(None, time.monotonic() + SERVICE_STOP_SECONDS):
            self.children.signal_all(None, signal.SIGKILL)
            self.wait_for_children(None, time.monotonic() + 5)
        try:
            self.client.delete(status_key(self.keys, self.config.supervisor.name))
        except redis.RedisError:
            pass
        log.info("supervisor stopped pid=%d", os.getpid())


def _needs_restart_settings(old, new) -> bool:
    """True when settings other than the group size changed, which workers read at start."""
    return (old.driver, old.timeouts, old.task_poll_interval, old.enable_task_polling) != (
        new.driver, new.timeouts, new.task_poll_interval, new.enable_task_polling,
    )  # fmt: skip


def _needs_restart(old: Config, new: Config, provider: str) -> bool:
    if provider not in old.providers:
        return False
    return _needs_restart_settings(old.providers[provider], new.providers[provider])
