"""The configuration file, its defaults, and its validation.

The YAML file uses the camelCase keys cloud panels already use. Each setting is
declared once below with its type, default and unit; `load_config` turns a file into
one `Config` object that the supervisor passes down to every process it forks.
An invalid file raises ConfigError naming the key, the value and what is allowed.
"""

import difflib
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml

from shared.errors import ConfigError
from shared.keys import PROVIDER_ID_PATTERN
from shared.states import DEFAULT_TIMEOUTS, TaskType

PLACEHOLDERS = ("id", "instance", "user", "provider", "type")
PLACEHOLDER_PATTERN = re.compile(r"\{([^{}]*)\}")

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]


class DriverConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """`type` is `command` or a Python class given as `module:Class`."""

    type: str
    # command driver: per task type an argv list, run without a shell
    commands: dict[str, list[str]] = {}
    # seconds between SIGTERM and SIGKILL when a task must stop
    kill_grace: Annotated[float, msgspec.Meta(ge=0, le=600)] = 5.0
    # command driver: working directory of the commands (default: the config file's folder)
    workdir: str | None = None
    # command driver: extra environment variables for the commands
    env: dict[str, str] = {}
    # Python driver: free-form options passed to the class
    options: dict[str, Any] = {}


class ProviderConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    driver: DriverConfig
    # false: one task at a time on this provider; true: up to maxConcurrentTasks
    allow_concurrent_tasks: bool = False
    max_concurrent_tasks: Annotated[int, msgspec.Meta(ge=0, le=256)] = 1
    # seconds between reconciliation passes
    task_poll_interval: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    enable_task_polling: bool = True
    # per-type timeout overrides in seconds
    timeouts: dict[TaskType, PositiveSeconds] = {}

    @property
    def group_size(self) -> int:
        return self.max_concurrent_tasks if self.allow_concurrent_tasks else 1

    def timeout_for(self, task_type: TaskType) -> float:
        return self.timeouts.get(task_type, DEFAULT_TIMEOUTS[task_type])


class RedisConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] = "taskvisor"
    # approximate maximum length of each provider's event stream
    events_max_len: Annotated[int, msgspec.Meta(ge=1000)] = 100_000
    # approximate maximum length of each provider's dead-letter stream
    dead_max_len: Annotated[int, msgspec.Meta(ge=100)] = 10_000


class DatabaseConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    # sqlite:///relative/path.db (relative to the config file), sqlite:////absolute/path.db,
    # or mysql://user:password@host:port/database
    url: str = "sqlite:///taskvisor.db"


class SupervisorConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    # consumer names in Redis start with this; two supervisors on one Redis need two names
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = ""
    # seconds that running tasks get to finish after SIGTERM/SIGINT
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 30.0
    # seconds a task lease lives without a heartbeat; workers renew it every third of that
    lease_seconds: Annotated[float, msgspec.Meta(ge=3, le=3600)] = 15.0


class Config(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    providers: dict[str, Any] = {}
    redis: RedisConfig = RedisConfig()
    database: DatabaseConfig = DatabaseConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    # field names whose values are replaced by *** in SQL, events, logs and CLI output,
    # on top of password, passwd, secret and token
    secret_fields: list[str] = []
    # folder that relative paths in the file are resolved against
    base_dir: str = "."


def _describe_value(raw: Any, path: list[str]) -> str:
    value = raw
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return ""
    text = repr(value)
    return f" (value {text[:80]})"


def _raise_validation(error: msgspec.ValidationError, raw: Any, prefix: str, source: str, struct: type) -> None:
    message = str(error)
    path: list[str] = []
    key_match = re.search(r" - at `key` in `\$([^`]*)`$", message)
    match = key_match or re.search(r" - at `\$([^`]*)`$", message)
    if match:
        message = message[: match.start()]
        path = [part for part in re.split(r"\.|\[|\]", match.group(1)) if part]
    location = ".".join(([prefix] if prefix else []) + path) or "(top level)"

    hint = ""
    unknown = re.match(r"Object contains unknown field `([^`]*)`", message)
    if unknown:
        fields = msgspec.structs.fields(_struct_at(struct, path))
        allowed = sorted(field.encode_name for field in fields if field.encode_name != "baseDir")
        close = difflib.get_close_matches(unknown.group(1), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(allowed)}"
        raise ConfigError(f"{source}: unknown key '{unknown.group(1)}' under {location}{hint}")
    if key_match:
        raise ConfigError(f"{source}: invalid key under {location}: {message}")
    raise ConfigError(f"{source}: invalid value at {location}{_describe_value(raw, path)}: {message}")


def _struct_at(struct: type, path: list[str]) -> type:
    current = struct
    for part in path:
        for field in msgspec.structs.fields(current):
            if field.encode_name == part and isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
                current = field.type
                break
    return current


def _check_driver(provider: str, driver: DriverConfig, source: str) -> None:
    location = f"providers.{provider}.driver"
    if driver.type == "command":
        if not driver.commands:
            raise ConfigError(f"{source}: {location}.commands is empty: give an argv list for each task type it runs")
        for type_name, argv in driver.commands.items():
            if type_name not in TaskType.__members__.values():
                allowed = ", ".join(TaskType)
                raise ConfigError(f"{source}: unknown task type '{type_name}' under {location}.commands; allowed: {allowed}")
            if not argv or not all(isinstance(arg, str) and arg for arg in argv):
                raise ConfigError(
                    f"{source}: {location}.commands.{type_name} must be a non-empty list of non-empty strings"
                )
            for arg in argv:
                for name in PLACEHOLDER_PATTERN.findall(arg):
                    if name not in PLACEHOLDERS:
                        allowed = ", ".join("{" + item + "}" for item in PLACEHOLDERS)
                        raise ConfigError(
                            f"{source}: unknown placeholder '{{{name}}}' in {location}.commands.{type_name}; allowed: {allowed}"
                        )
                    if arg != "{" + name + "}":
                        # Substituting inside a longer argument would let an id change its meaning.
                        raise ConfigError(
                            f"{source}: placeholder '{{{name}}}' in {location}.commands.{type_name} argument {arg!r} "
                            f"must be a whole argument: write it as a separate list item, or read the value from "
                            f"the task JSON on stdin or the TASKVISOR_* environment variables"
                        )
    elif not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", driver.type):
        raise ConfigError(
            f"{source}: invalid value at {location}.type ({driver.type!r}): expected 'command' or a Python class as 'module:Class'"
        )


def parse_provider(provider: str, raw: Any, source: str) -> ProviderConfig:
    if not PROVIDER_ID_PATTERN.match(str(provider)):
        raise ConfigError(f"{source}: invalid provider id {provider!r}: expected 1-64 characters of A-Za-z0-9._-")
    try:
        settings = msgspec.convert(raw, ProviderConfig)
    except msgspec.ValidationError as error:
        _raise_validation(error, raw, f"providers.{provider}", source, ProviderConfig)
    _check_driver(provider, settings.driver, source)
    return settings


def parse_config(raw: Any, source: str, base_dir: str) -> Config:
    """Validate a decoded YAML document and return the Config, raising ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if "baseDir" in raw:
        raise ConfigError(f"{source}: unknown key 'baseDir' under (top level)")
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as error:
        _raise_validation(error, raw, "", source, Config)
    if not isinstance(config.providers, dict):
        raise ConfigError(f"{source}: 'providers' must be a mapping of provider id to settings")

    providers = {str(name): parse_provider(str(name), value, source) for name, value in config.providers.items()}
    supervisor = config.supervisor
    if not supervisor.name:
        supervisor = msgspec.structs.replace(supervisor, name=default_supervisor_name())
    return msgspec.structs.replace(config, providers=providers, supervisor=supervisor, base_dir=base_dir)


def default_supervisor_name() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "taskvisor"


def load_config(path: str | os.PathLike | None) -> Config:
    """Read and validate the YAML file at `path`; None gives the defaults with no providers."""
    if path is None:
        return parse_config({}, "(defaults)", os.getcwd())
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {file} not found: pass --config with the path of an existing file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file} could not be read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
    return parse_config(raw, str(file), str(file.resolve().parent))


def apply_overrides(config: Config, redis_url: str | None = None, database_url: str | None = None) -> Config:
    """Return `config` with the URLs given on the command line or in the environment."""
    if redis_url:
        config = msgspec.structs.replace(config, redis=msgspec.structs.replace(config.redis, url=redis_url))
    if database_url:
        config = msgspec.structs.replace(config, database=msgspec.structs.replace(config.database, url=database_url))
    return config
