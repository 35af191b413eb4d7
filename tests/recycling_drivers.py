"""A Python driver for the worker recycling tests, used as `tests.recycling_drivers:HoardingDriver`."""

import os

from worker.drivers.base import Driver, TaskContext

# Memory that `start` keeps for the rest of the worker process's life.
_hoard: list[bytes] = []


class HoardingDriver(Driver):
    """`start` keeps data.allocate_mb MiB allocated, so the worker's resident memory grows."""

    def start(self, context: TaskContext) -> dict:
        megabytes = int(context.data.get("allocate_mb", 0))
        # Filled with a non-zero byte, so the pages are written and count as resident.
        _hoard.append(b"\x01" * (megabytes * 1024 * 1024))
        return {"pid": os.getpid()}
