"""Linux process settings used by the children of the supervisor."""

import ctypes
import logging
import os
import signal

import psutil

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1

# This process's id, renewed in a forked child, so that code that runs for every task or
# log line can notice a fork without a getpid() system call.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def current_pid() -> int:
    """Return this process's id, as os.getpid() would, without a system call."""
    return _pid


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies.

    Without it, a SIGKILLed supervisor would leave its workers running unsupervised.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum))
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) is not available")


def stop_on_sigterm(owner: object) -> None:
    """Make SIGTERM set `owner.stopping`, and ignore SIGINT.

    For the supervisor's helper processes: the supervisor, not the terminal, decides
    when they stop, and their loops end once `stopping` is true.
    """

    def on_term(signum: int, frame: object) -> None:
        owner.stopping = True

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)


def process_alive(pid: int) -> bool:
    """Return True when process `pid` exists on this host and is not a zombie."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
