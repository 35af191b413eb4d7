"""Logging set-up shared by the supervisor, its children and the CLI."""

import logging
import sys

# Name of the process's role, shown on every line: supervisor, intake, mirror, or the
# worker's provider and slot. Children set it right after the fork.
_role = "cli"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def set_role(role: str) -> None:
    global _role
    _role = role


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
