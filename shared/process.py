"""Linux process settings used by the children of the supervisor."""

import ctypes
import logging
import signal

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


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
