"""The supervisor's child processes: forking, reaping, resizing and retiring them.

`reconcile` compares the children that the current config wants, one per
(role, provider, slot), with the ones that run. It forks what is missing and retires
what is surplus. Retiring sends SIGTERM, which lets a worker finish its current task
and exit; a worker never gets killed by a resize. When a retiring worker's slot is
wanted again before it exits (a quick 4 -> 1 -> 4), SIGUSR2 takes the retirement
back, so the group never runs more workers than its limit.
"""

import logging
import os
import signal
import time
from collections.abc import Callable

import msgspec
import psutil

from shared import heartbeat
from shared.heartbeat import NO_SLOT, HeartbeatTable
from shared.logs import set_role
from shared.process import die_with_parent
from worker.main import EXIT_BOOT_FAILURE, EXIT_RECYCLE_MEMORY, EXIT_RECYCLE_TASKS

log = logging.getLogger(__name__)

# A child that exits sooner than this after its start counts as a failed start.
QUICK_EXIT_SECONDS = 5.0
MAX_RESPAWN_DELAY = 30.0
# Exit codes of a worker that reached a recycling limit after a task, and the limit's name.
RECYCLE_REASONS = {EXIT_RECYCLE_TASKS: "maxTasksPerWorker", EXIT_RECYCLE_MEMORY: "maxWorkerMemoryMB"}

ChildKey = tuple[str, str, int]


class Child(msgspec.Struct):
    pid: int
    role: str
    provider: str = ""
    slot: int = -1
    started: float = 0.0
    # Why the supervisor sent SIGTERM: "" (it did not), "resize", "restart" or "remove".
    retiring: str = ""
    # Index of the child's slot in the heartbeat table.
    heartbeat_slot: int = NO_SLOT

    @property
    def key(self) -> ChildKey:
        return (self.role, self.provider, self.slot)


class Children:
    def __init__(
        self, supervisor_pid: int, close_in_child: Callable[[], None], heartbeats: HeartbeatTable | None = None
    ) -> None:
        self.supervisor_pid = supervisor_pid
        self.close_in_child = close_in_child
        self.heartbeats = heartbeats
        self.by_pid: dict[int, Child] = {}
        # key -> (monotonic time before which it is not respawned, current delay)
        self.respawn_after: dict[ChildKey, tuple[float, float]] = {}
        self.stopping = False
        # Children reaped but not yet handed to the supervisor by `take_exited`. Several
        # calls reap (kill_orphans too), and none of their exits may be missed.
        self.exited: list[Child] = []

    # -- forking -------------------------------------------------------------------

    def fork(self, key: ChildKey, target: Callable[[], int], role_name: str) -> None:
        role, provider, slot = key
        heartbeat_slot = self.heartbeats.assign(role, provider, slot) if self.heartbeats is not None else NO_SLOT
        try:
            pid = os.fork()
        except OSError:
            if self.heartbeats is not None:
                self.heartbeats.cancel(heartbeat_slot)
            raise
        if pid == 0:
            self._run_child(target, role_name, heartbeat_slot)
        if self.heartbeats is not None:
            self.heartbeats.set_pid(heartbeat_slot, pid)
        self.by_pid[pid] = Child(
            pid=pid, role=role, provider=provider, slot=slot, started=time.monotonic(), heartbeat_slot=heartbeat_slot
        )
        log.debug("child started role=%s provider=%s slot=%d pid=%d", role, provider or "-", slot, pid)

    def _run_child(self, target: Callable[[], int], role_name: str, heartbeat_slot: int) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            self.close_in_child()
            set_role(role_name)
            heartbeat.attach(self.heartbeats, heartbeat_slot)
            die_with_parent()
            if os.getppid() != self.supervisor_pid:
                # The supervisor died before the request above took effect.
                os._exit(0)
            code = target()
        except BaseException:
            log.exception("child process crashed role=%s pid=%d", role_name, os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    # -- matching the wanted set -----------------------------------------------------

    def reconcile(self, wanted: list[ChildKey], start: Callable[[ChildKey], None], retire_reason: Callable[[Child], str]) -> None:
        """Fork missing children, take back retirements that are wanted again, retire surplus ones."""
        running = {child.key: child for child in self.by_pid.values()}
        wanted_set = set(wanted)
        now = time.monotonic()
        for key in wanted:
            child = running.get(key)
            if child is None:
                if now >= self.respawn_after.get(key, (0.0, 0.0))[0]:
                    start(key)
            elif child.retiring == "resize":
                self.send(child, signal.SIGUSR2)
                child.retiring = ""
                log.info("retirement taken back role=%s provider=%s slot=%d pid=%d", *key, child.pid)
        for child in list(self.by_pid.values()):
            if child.key not in wanted_set and not child.retiring:
                self.retire(child, retire_reason(child))

    def retire(self, child: Child, reason: str) -> None:
        """Ask a child to finish its current work and exit."""
        child.retiring = reason
        self.send(child, signal.SIGTERM)
        log.info(
            "child retiring role=%s provider=%s slot=%d pid=%d reason=%s",
            child.role, child.provider or "-", child.slot, child.pid, reason,
        )  # fmt: skip

    def send(self, child: Child, signum: int) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    def signal_all(self, role: str | None, signum: int) -> None:
        for child in list(self.by_pid.values()):
            if role is None or child.role == role:
                self.send(child, signum)

    def count(self, role: str | None = None) -> int:
        return sum(1 for child in self.by_pid.values() if role is None or child.role == role)

    # -- reaping -----------------------------------------------------------------------

    def reap(self) -> list[Child]:
        """Reap every exited child, log how it ended, and return the known ones."""
        ended = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return ended
            if pid == 0:
                return ended
            child = self.by_pid.pop(pid, None)
            if child is None:
                continue
            if self.heartbeats is not None:
                self.heartbeats.release(child.heartbeat_slot, status, self.stopping or bool(child.retiring))
            self._log_exit(child, status)
            self._schedule_respawn(child, status)
            ended.append(child)
            self.exited.append(child)

    def _log_exit(self, child: Child, status: int) -> None:
        what = f"role={child.role} provider={child.provider or '-'} slot={child.slot} pid={child.pid}"
        expected = self.stopping or bool(child.retiring)
        recycled = recycle_reason(child, status)
        if recycled:
            replaced = "" if expected else "; replacing it at once"
            log.info("worker recycled after reaching its %s limit%s %s", recycled, replaced, what)
        elif os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            level = logging.INFO if expected and name in ("SIGTERM", "SIGKILL") else logging.ERROR
            log.log(level, "child killed by signal %s %s", name, what)
        elif os.WEXITSTATUS(status) == 0:
            log.log(logging.INFO if expected else logging.WARNING, "child exited %s", what)
        else:
            log.error("child exited with code %d %s", os.WEXITSTATUS(status), what)

    def _schedule_respawn(self, child: Child, status: int) -> None:
        if self.stopping:
            return
        key = child.key
        quick = time.monotonic() - child.started < QUICK_EXIT_SECONDS
        failed_boot = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_FAILURE
        # A recycled worker finished its tasks, so a quick exit is no sign of a broken start.
        if (quick and not child.retiring and not recycle_reason(child, status)) or failed_boot:
            _not_before, delay = self.respawn_after.get(key, (0.0, 0.0))
            delay = min(max(delay * 2, 1.0), MAX_RESPAWN_DELAY)
            self.respawn_after[key] = (time.monotonic() + delay, delay)
            log.warning(
                "respawn delayed role=%s provider=%s slot=%d delay=%.0fs",
                child.role, child.provider or "-", child.slot, delay,
            )  # fmt: skip
        else:
            self.respawn_after.pop(key, None)

    def take_exited(self) -> list[Child]:
        """Return the children reaped since the last call, by any caller of `reap`."""
        exited, self.exited = self.exited, []
        return exited

    def kill_orphans(self) -> None:
        """Kill the process groups of commands whose worker died.

        The supervisor is the child subreaper, so when a worker dies its running command
        is re-parented here. Its task is taken over by another worker, so the command
        must not go on changing the instance behind that worker's back.
        """
        try:
            strays = [proc for proc in psutil.Process(self.supervisor_pid).children() if proc.pid not in self.by_pid]
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
            self.reap()


def recycle_reason(child: Child, status: int) -> str:
    """Return the name of the limit that made a worker recycle itself, or '' for any other exit."""
    if child.role != "worker" or not os.WIFEXITED(status):
        return ""
    return RECYCLE_REASONS.get(os.WEXITSTATUS(status), "")
