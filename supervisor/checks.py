"""Start-up checks that find configuration mistakes before a task fails on them."""

import logging
import os
import shutil
from pathlib import Path

import redis

from shared.keys import PROVIDER_ID_PATTERN, Keys
from shared.settings import Config

log = logging.getLogger(__name__)


def warn_about_commands(config: Config) -> None:
    """Log a warning for each configured command whose program is missing or not executable."""
    for provider, settings in config.providers.items():
        driver = settings.driver
        if driver.type != "command":
            continue
        workdir = Path(config.base_dir) / (driver.workdir or ".")
        for task_type, argv in driver.commands.items():
            program = argv[0]
            if "/" in program:
                path = workdir / program
                usable = path.is_file() and os.access(path, os.X_OK)
            else:
                usable = shutil.which(program) is not None
            if not usable:
                log.warning(
                    "command not found or not executable provider=%s type=%s program=%s workdir=%s",
                    provider, task_type, program, workdir,
                )  # fmt: skip


def warn_about_unknown_streams(client: redis.Redis, keys: Keys, config: Config) -> None:
    """Log a warning for task streams with entries whose provider is not configured."""
    pattern = f"{keys.prefix}:{{*}}:tasks"
    for name in client.scan_iter(match=pattern, count=1000):
        stream = name.decode("utf-8", "replace")
        provider = keys.provider_from_task_key(stream)
        if provider in config.providers or not PROVIDER_ID_PATTERN.match(provider):
            continue
        length = client.xlen(name)
        if length:
            log.warning(
                "task stream of an unknown provider has entries that nothing will run provider=%s stream=%s entries=%d",
                provider, stream, length,
            )  # fmt: skip
