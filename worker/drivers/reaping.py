"""Reaping of the processes that commands leave behind.

The worker becomes the child subreaper, so descendants of a command that outlive
their parent are re-parented to the worker instead of init and can be reaped here.
"""

import ctypes
import logging
import os
import sys
import threading

import psutil

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


# Pids of programs started by the command driver that Popen has not reaped yet. The orphan
# reaper skips them, because reaping one would make its Popen report exit status 0.
running_pids: set[int] = set()
running_pids_lock = threading.Lock()
_subreaper_lock = threading.Lock()
# The process that last called prctl. The flag is not inherited across fork(), so a
# forked child calls it again.
_subreaper_pid: int | None = None


def _reset_after_fork() -> None:
    global running_pids, running_pids_lock, _subreaper_lock
    running_pids = set()
    running_pids_lock = threading.Lock()
    _subreaper_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def enable_child_subreaper() -> None:
    """Make this process the child subreaper on Linux, once per process.

    Descendants of a command that outlive their parent are then re-parented to the
    worker instead of init, so they stay visible and get reaped here.
    """
    global _subreaper_pid
    with _subreaper_lock:
        if _subreaper_pid == os.getpid():
            return
        _subreaper_pid = os.getpid()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            log.debug("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(error))
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_CHILD_SUBREAPER) is unavailable: %s", exc)


def reap_orphans() -> int:
    """Reap exited children that no running command owns and return how many were reaped.

    These are descendants of commands re-parented to the worker as subreaper.
    NOTE: a child started elsewhere in the worker process without this module (for
    example by a Python driver) is reaped too if it has exited, and its Popen then
    reports exit status 0.
    """
    reaped = 0
    with running_pids_lock:
        try:
            children = psutil.Process().children()
        except psutil.Error as exc:
            log.warning("listing child processes failed: %s", exc)
            return 0
        for child in children:
            if child.pid in running_pids:
                continue
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if pid:
                reaped += 1
                log.debug("reaped orphan pid=%d status=%d", pid, status)
    return reaped
