"""The supervisor: the parent process that forks and watches every other process.

It forks one group of workers per provider, plus an intake process (makes new tasks
visible as pending) and a mirror process (copies state changes into SQL). The
supervisor itself stays single-threaded and never touches a task: its loop waits for
a signal or a one-second tick, then runs named steps. Signal handlers only record
the signal; the loop acts on it.
"""

import logging
import os
import select
import signal
import time
from collections.abc import Callable

import msgspec
import psutil
import redis

from shared.errors import TaskvisorError
from shared.keys import WORKER_GROUP, Keys
from shared.logs import set_role
from shared.process import die_with_parent
from shared.redaction import redact_url
from shared.redis_client import connect, ensure_group
from shared.settings import Config
from shared.store import open_store
from supervisor.intake import intake_main
from supervisor.mirror import mirror_main
from supervisor.recovery import reassign_orphans
from worker.drivers.reaping import enable_child_subreaper
from worker.main import EXIT_BOOT_FAILURE, worker_main

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
# A child that exits sooner than this after its start counts as a failed start.
QUICK_EXIT_SECONDS = 5.0
MAX_RESPAWN_DELAY = 30.0
# Seconds that a worker told to abort its task gets before SIGKILL.
ABORT_MARGIN_SECONDS = 5.0
SERVICE_STOP_SECONDS = 10.0


class Child(msgspec.Struct):
    pid: int
    role: str
    provider: str = ""
    slot: int = -1
    started: float = 0.0


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.signals: list[int] = []
        self.stopping = False
        self.cold_stop = False
        # (role, provider, slot) -> (monotonic time before which it is not respawned, delay)
        self.respawn_after: dict[tuple[str, str, int], tuple[float, float]] = {}
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self.wakeup_write, False)

    # -- start -------------------------------------------------------------------

    def prepare(self) -> None:
        """Check Redis and the database, create the schema and the consumer groups."""
        config = self.config
        client = connect(config.redis.url)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise TaskvisorError(
                f"cannot reach Redis at {redact_url(config.redis.url)}: {exc}; start Redis or pass --redis-url"
            ) from None
        store = open_store(config.database.url, config.base_dir)
        store.init_schema()
        store.close()
        for provider, settings in config.providers.items():
            if settings.group_size == 0:
                log.warning("provider has no workers (maxConcurrentTasks: 0); its tasks wait in the stream provider=%s", provider)
            ensure_group(client, self.keys.tasks(provider), WORKER_GROUP)
            reassign_orphans(client, self.keys, config.supervisor.name, provider, settings.group_size)
        client.close()

    def kill_orphans(self) -> None:
        """Kill the process groups of commands whose worker died.

        The supervisor is the child subreaper, so when a worker dies its running command
        is re-parented here. Its task is taken over by another worker, so the command
        must not go on changing the instance behind that worker's back.
        """
        known = set(self.children)
        try:
            strays = [proc for proc in psutil.Process(self.pid).children() if proc.pid not in known]
        except psutil.Error:
            return
        own_group = os.getpgid(0)
        for proc in strays:
            try:
                group = os.getpgid(proc.pid)
                command = " ".join(proc.cmdline())[:200]
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
                else:
                    os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, psutil.Error):
                continue
            log.warning("killed process left by a dead worker pid=%d group=%d command=%s", proc.pid, group, command)
        if strays:
            self.reap_children()

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
            self.spawn_missing()
            self.wait_for_wakeup(TICK_SECONDS)
            self.handle_signals()
            self.reap_children()
            self.kill_orphans()
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
                log.info("signal received signal=%s; stopping", signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                log.info("SIGHUP received; live reload is not supported yet, restart to apply config changes")

    # -- children ------------------------------------------------------------------

    def wanted_children(self) -> list[tuple[str, str, int]]:
        wanted = [("intake", "", 0), ("mirror", "", 0)]
        for provider, settings in self.config.providers.items():
            wanted += [("worker", provider, slot) for slot in range(settings.group_size)]
        return wanted

    def spawn_missing(self) -> None:
        running = {(child.role, child.provider, child.slot) for child in self.children.values()}
        now = time.monotonic()
        for key in self.wanted_children():
            if key in running:
                continue
            not_before, _delay = self.respawn_after.get(key, (0.0, 0.0))
            if now < not_before:
                continue
            role, provider, slot = key
            if role == "worker":
                self.fork(key, lambda p=provider, s=slot: worker_main(self.config, p, s), f"worker:{provider}:{slot}")
            elif role == "intake":
                self.fork(key, lambda: intake_main(self.config), "intake")
            else:
                self.fork(key, lambda: mirror_main(self.config), "mirror")

    def fork(self, key: tuple[str, str, int], target: Callable[[], int], role_name: str) -> None:
        role, provider, slot = key
        pid = os.fork()
        if pid == 0:
            self._run_child(target, role_name)
        self.children[pid] = Child(pid=pid, role=role, provider=provider, slot=slot, started=time.monotonic())
        log.debug("child started role=%s provider=%s slot=%d pid=%d", role, provider or "-", slot, pid)

    def _run_child(self, target: Callable[[], int], role_name: str) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            os.close(self.wakeup_read)
            os.close(self.wakeup_write)
            set_role(role_name)
            die_with_parent()
            if os.getppid() != self.pid:
                # The supervisor died before the request above took effect.
                os._exit(0)
            code = target()
        except BaseException:
            log.exception("child process crashed role=%s pid=%d", role_name, os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self.log_exit(child, status)
            self.schedule_respawn(child, status)

    def log_exit(self, child: Child, status: int) -> None:
        what = f"role={child.role} provider={child.provider or '-'} slot={child.slot} pid={child.pid}"
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            level = logging.INFO if self.stopping and name in ("SIGTERM", "SIGKILL") else logging.ERROR
            log.log(level, "child killed by signal %s %s", name, what)
        elif os.WEXITSTATUS(status) == 0:
            log.log(logging.INFO if self.stopping else logging.WARNING, "child exited %s", what)
        else:
            log.error("child exited with code %d %s", os.WEXITSTATUS(status), what)

    def schedule_respawn(self, child: Child, status: int) -> None:
        key = (child.role, child.provider, child.slot)
        quick = time.monotonic() - child.started < QUICK_EXIT_SECONDS
        failed_boot = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_FAILURE
        if quick or failed_boot:
            _not_before, delay = self.respawn_after.get(key, (0.0, 0.0))
            delay = min(max(delay * 2, 1.0), MAX_RESPAWN_DELAY)
            self.respawn_after[key] = (time.monotonic() + delay, delay)
            log.warning("respawn delayed role=%s provider=%s slot=%d delay=%.0fs", child.role, child.provider or "-", child.slot, delay)
        else:
            self.respawn_after.pop(key, None)

    # -- shutdown --------------------------------------------------------------------

    def signal_children(self, role: str | None, signum: int) -> None:
        for child in list(self.children.values()):
            if role is None or child.role == role:
                try:
                    os.kill(child.pid, signum)
                except ProcessLookupError:
                    pass

    def wait_for_children(self, role: str | None, deadline: float, until_cold_stop: bool = False) -> bool:
        """Reap until no child of `role` is left or the deadline passes; True when none is left.

        With `until_cold_stop`, a second SIGTERM or Ctrl-C also ends the wait.
        """
        while True:
            self.reap_children()
            left = [child for child in self.children.values() if role is None or child.role == role]
            if not left:
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
        workers = sum(1 for child in self.children.values() if child.role == "worker")
        log.info("stopping workers count=%d grace=%.0fs", workers, grace)
        self.signal_children("worker", signal.SIGTERM)
        if not self.wait_for_children("worker", time.monotonic() + grace, until_cold_stop=True):
            log.warning("grace period over; stopping running tasks and returning them to pending")
            self.signal_children("worker", signal.SIGUSR1)
            kill_grace = max((p.driver.kill_grace for p in self.config.providers.values()), default=5.0)
            if not self.wait_for_children("worker", time.monotonic() + kill_grace + ABORT_MARGIN_SECONDS):
                log.error("workers did not stop; sending SIGKILL")
                self.signal_children("worker", signal.SIGKILL)
                self.wait_for_children("worker", time.monotonic() + 5)
        log.info("workers stopped")

        log.info("stopping intake and mirror")
        self.signal_children(None, signal.SIGTERM)
        if not self.wait_for_children(None, time.monotonic() + SERVICE_STOP_SECONDS):
            self.signal_children(None, signal.SIGKILL)
            self.wait_for_children(None, time.monotonic() + 5)
        log.info("supervisor stopped pid=%d", os.getpid())

