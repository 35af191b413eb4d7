"""Reloading of the configuration while the supervisor runs.

The effective provider settings are the config file's, with the Redis settings hashes
merged over them (see shared/provider_settings.py). The watcher reloads them when
the file changes or gets a SIGHUP, when a notice arrives on the config channel, and
every few seconds in any case, so a change without a notice still applies.
"""

import logging
import os
import time
from pathlib import Path

import msgspec
import redis

from shared.errors import ConfigError
from shared.keys import Keys
from shared.provider_settings import config_channel, merge_providers, read_overrides
from shared.settings import Config, apply_overrides, load_config, read_config_document

log = logging.getLogger(__name__)

# Seconds between reloads when nothing announced a change.
RELOAD_INTERVAL_SECONDS = 5.0


class ConfigWatcher:
    def __init__(self, config_path: str | None, redis_url: str | None, database_url: str | None) -> None:
        self.config_path = config_path
        self.redis_url = redis_url
        self.database_url = database_url
        self.file_stamp = self._file_stamp()
        self.next_reload = 0.0
        self.reload_requested = False
        self.pubsub = None
        self.errors: dict[str, str] = {}
        # The last error of the config file, logged once until it changes.
        self.file_error = ""

    def _file_stamp(self) -> tuple[float, int] | None:
        if self.config_path is None:
            return None
        try:
            status = os.stat(self.config_path)
        except OSError:
            return None
        return status.st_mtime, status.st_size

    def request_reload(self) -> None:
        self.reload_requested = True

    def poll(self, client: redis.Redis, current: Config) -> Config | None:
        """Return the new effective config when a reload is due and something changed."""
        stamp = self._file_stamp()
        if stamp != self.file_stamp:
            self.file_stamp = stamp
            self.reload_requested = True
            log.info("config file changed path=%s", self.config_path)
        if self._notice_arrived(client, current):
            self.reload_requested = True
        if not self.reload_requested and time.monotonic() < self.next_reload:
            return None
        self.reload_requested = False
        self.next_reload = time.monotonic() + RELOAD_INTERVAL_SECONDS
        new = self.load(client, current)
        if new is None or new == current:
            return None
        return new

    def _notice_arrived(self, client: redis.Redis, current: Config) -> bool:
        if self.pubsub is None:
            self.pubsub = client.pubsub(ignore_subscribe_messages=True)
            self.pubsub.subscribe(config_channel(Keys(current.redis.prefix)))
        arrived = False
        while self.pubsub.get_message(timeout=0) is not None:
            arrived = True
        return arrived

    def reset_connection(self) -> None:
        """Forget the subscription after a Redis error; the next poll subscribes again."""
        self.pubsub = None

    def load(self, client: redis.Redis, current: Config) -> Config | None:
        """Read the file and the Redis settings; None keeps the running config."""
        try:
            base = apply_overrides(load_config(self.config_path), self.redis_url, self.database_url)
            document = read_config_document(Path(self.config_path)) if self.config_path else {}
        except ConfigError as exc:
            if str(exc) != self.file_error:
                self.file_error = str(exc)
                log.error("config file not applied; the running settings stay error=%s", exc)
            return None
        if self.file_error:
            log.info("config file valid again path=%s", self.config_path)
            self.file_error = ""
        file_providers = document.get("providers") or {}
        keys = Keys(base.redis.prefix)
        overrides, read_errors = read_overrides(client, keys, list(file_providers))
        providers, merge_errors = merge_providers(file_providers, overrides, current.providers)
        errors = {**read_errors, **merge_errors}
        for provider, message in errors.items():
            if self.errors.get(provider) != message:
                log.error("provider settings not applied provider=%s error=%s", provider, message)
        self.errors = errors
        return msgspec.structs.replace(base, providers=providers)
