"""The configuration file, its defaults, and its validation.

The YAML file uses the camelCase keys cloud panels already use. Each setting is
declared once below with its type, default and unit; `load_config` turns a file into
one `Config` object that the supervisor passes down to every process it forks.
An invalid file raises ConfigError naming the key, the value and what is allowed.
"""

import difflib
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from shared.errors import ConfigError
from shared.keys import PROVIDER_ID_PATTERN
from shared.redaction import redact_url
from shared.redis_client import parse_url as parse_redis_url
from shared.states import DEFAULT_TIMEOUTS, IDEMPOTENT_TYPES, TaskType
from shared.store import ACCEPTED_FORMS as DATABASE_URL_FORMS

PLACEHOLDERS = ("id", "instance", "user", "provider", "type")
PLACEHOLDER_PATTERN = re.compile(r"\{([^{}]*)\}")

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]
InterruptAction = Literal["rerun", "probe", "fail"]
INTERRUPT_ACTIONS = ("rerun", "probe", "fail")

TASK_TYPE_NAMES = ", ".join(TaskType)

# Bounds of `maxWorkerMemoryMB` other than 0. A worker uses about 40 MiB before its first
# task (measured with CPython 3.11), so a smaller limit would replace it after every task.
MIN_WORKER_MEMORY_MB = 64
MAX_WORKER_MEMORY_MB = 1024 * 1024
# Smallest `supervisor.retention` other than 0: finished tasks stay readable at least this long.
MIN_RETENTION_SECONDS = 3600
MAX_RETENTION_SECONDS = 10 * 366 * 86400

# redis://, rediss:// and unix:// go to redis-py 8.2's Redis.from_url, and
# shared.redis_client parses the other two.
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
REDIS_URL_RULE = (
    "expected a URL that starts with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://,"
    " such as redis://127.0.0.1:6379/0 (see the redis section of docs/configuration.md)"
)
# The URL starts that shared.store.open_store accepts. Like open_store, the check ignores the case of the scheme.
DATABASE_URL_PREFIXES = ("sqlite:///", "mysql://", "mariadb://")

# Plain-English names for the type names in msgspec's messages, as expected and as received.
EXPECTED_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
    "null": "null", "object": "a mapping", "array": "a list",
}  # fmt: skip
RECEIVED_TYPE_WORDS = {**EXPECTED_TYPE_WORDS, "float": "a decimal number", "bool": "a boolean"}
BOUND_WORDS = {">=": "of at least", "<=": "of at most", ">": "greater than", "<": "less than"}


class DriverConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """`type` is `command` or a Python class given as `module:Class`."""

    type: str
    # command driver: per task type an argv list, run without a shell
    commands: dict[str, list[str]] = {}
    # command driver: per task type an argv list that reports what an interrupted run did
    probes: dict[str, list[str]] = {}
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
    # true: no worker takes tasks; they wait in the stream (set by `taskvisor provider pause`)
    paused: bool = False
    # per task type: what a worker does with a task whose earlier run was interrupted
    # (its worker died, or a shutdown stopped it): rerun, probe or fail
    on_interrupt: dict[TaskType, InterruptAction] = {}
    # runs that ended with their worker dead after which a task is failed as poison
    max_interrupted_runs: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # per task type: automatic retries after a failure or timeout (0, the default, for none)
    max_retries: dict[TaskType, Annotated[int, msgspec.Meta(ge=0, le=100)]] = {}
    # seconds before the first automatic retry; each later one waits twice as long, up to the cap
    retry_backoff_base: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 2.0
    retry_backoff_cap: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    # a worker exits after this many tasks and is replaced at once (0, the default: never)
    max_tasks_per_worker: Annotated[int, msgspec.Meta(ge=0)] = 0
    # a worker whose resident memory is above this many MiB after a task exits and is
    # replaced at once (0, the default: never); see MIN_WORKER_MEMORY_MB
    max_worker_memory_mb: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKER_MEMORY_MB)] = msgspec.field(
        default=0, name="maxWorkerMemoryMB"
    )

    @property
    def group_size(self) -> int:
        if self.paused:
            return 0
        return self.max_concurrent_tasks if self.allow_concurrent_tasks else 1

    def timeout_for(self, task_type: TaskType) -> float:
        return self.timeouts.get(task_type, DEFAULT_TIMEOUTS[task_type])

    def interrupt_action_for(self, task_type: TaskType) -> str:
        default = "rerun" if task_type in IDEMPOTENT_TYPES else "probe"
        return self.on_interrupt.get(task_type, default)

    def retries_for(self, task_type: TaskType) -> int:
        return self.max_retries.get(task_type, 0)

    def retry_delay(self, retry_number: int) -> float:
        """Seconds before automatic retry number `retry_number` (1 for the first)."""
        return min(self.retry_backoff_cap, self.retry_backoff_base * 2 ** max(0, retry_number - 1))


class RedisConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] = "taskvisor"
    # seconds that events stay in a provider's event stream after every consumer group
    # read them, for panels that read the stream. Unread events are never trimmed.
    events_retention: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 3600.0
    # 0 (the default): no cap. Otherwise an approximate cap on each event stream's length
    # that trims even events the mirror has not written; see docs/configuration.md
    events_max_len: Annotated[int, msgspec.Meta(ge=0)] = 0
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
    # nice levels that workers run below the supervisor, so that under CPU pressure the
    # intake, the SQL mirror and the health endpoint keep up. 0 runs them alike.
    worker_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    # seconds after which the reconciliation pass deletes finished tasks from Redis and
    # SQL; 0 (the default) keeps them forever
    retention: Annotated[float, msgspec.Meta(ge=0, le=MAX_RETENTION_SECONDS)] = 0.0


class HealthConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    # false: no monitor process and no HTTP endpoint
    enabled: bool = True
    # IP address the HTTP endpoint listens on; a non-loopback one needs allowNonLoopback
    address: str = "127.0.0.1"
    # TCP port; 0 lets the kernel choose a free port, which the monitor logs at start
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9180
    # true: allow an address other than 127.0.0.0/8 or ::1 (the endpoint has no authentication)
    allow_non_loopback: bool = False
    # seconds without a heartbeat after which a process counts as stalled; processes beat every second
    heartbeat_timeout: Annotated[float, msgspec.Meta(ge=2, le=3600)] = 5.0
    # seconds the oldest state change not yet written to SQL may wait before /readyz fails
    mirror_lag_limit: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 30.0


class Config(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    providers: dict[str, Any] = {}
    redis: RedisConfig = RedisConfig()
    database: DatabaseConfig = DatabaseConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    health: HealthConfig = HealthConfig()
    # field names whose values are replaced by *** in SQL, events, logs and CLI output,
    # on top of password, passwd, secret and token
    secret_fields: list[str] = []
    # folder that relative paths in the file are resolved against
    base_dir: str = "."


def _split_path(text: str) -> list[str | int]:
    """Split a msgspec path such as `.driver.commands[0]` into keys and list indexes.

    msgspec writes `[...]` for a value inside a dict without naming its key. That part
    is kept as the string "[...]".
    """
    parts: list[str | int] = []
    for key, index in re.findall(r"\.([^.\[\]]+)|\[(\d+|\.\.\.)\]", text):
        if key:
            parts.append(key)
        elif index == "...":
            parts.append("[...]")
        else:
            parts.append(int(index))
    return parts


def _join_location(prefix: str, parts: list[str | int]) -> str:
    location = prefix
    for part in parts:
        if isinstance(part, int):
            location += f"[{part}]"
        elif part == "[...]":
            location += part
        else:
            location = f"{location}.{part}" if location else part
    return location


def _where(preposition: str, location: str) -> str:
    return f"{preposition} {location}" if location else "at the top level"


def _describe_value(raw: Any, path: list[str | int]) -> str:
    value = raw
    for part in path:
        in_list = isinstance(part, int) and isinstance(value, list) and part < len(value)
        in_dict = isinstance(part, str) and isinstance(value, dict) and part in value
        if not (in_list or in_dict):
            return ""
        value = value[part]
    text = repr(value)
    return f" (value {text[:80]})"


def _format_bound(number: str) -> str:
    return number.removesuffix(".0")


def _plain_message(message: str) -> str:
    """Rephrase a msgspec message such as "Expected `int`, got `str`" in plain English.

    Forms that are not listed here are returned unchanged.
    """
    missing = re.fullmatch(r"Object missing required field `([^`]*)`", message)
    if missing:
        return f"missing required key '{missing.group(1)}'"
    expected = re.fullmatch(r"Expected `([^`]*)`(.*)", message)
    if not expected:
        return message
    words = [EXPECTED_TYPE_WORDS.get(name) for name in expected.group(1).split(" | ")]
    if None in words:
        return message
    wanted = " or ".join(words)

    rest = expected.group(2)
    received = re.fullmatch(r", got `([^`]*)`", rest)
    if received and received.group(1) in RECEIVED_TYPE_WORDS:
        return f"expected {wanted}, got {RECEIVED_TYPE_WORDS[received.group(1)]}"
    bound = re.fullmatch(r" (>=|<=|>|<) (\S+)", rest)
    if bound:
        return f"expected {wanted} {BOUND_WORDS[bound.group(1)]} {_format_bound(bound.group(2))}"
    pattern = re.fullmatch(r" matching regex (.*)", rest)
    if pattern:
        return f"expected {wanted} matching the regular expression {pattern.group(1)}"
    return message


def _raise_validation(
    error: msgspec.ValidationError, raw: Any, prefix: str, source: str, struct: type | None = None
) -> None:
    message = str(error)
    path: list[str | int] = []
    key_match = re.search(r" - at `key` in `\$([^`]*)`$", message)
    match = key_match or re.search(r" - at `\$([^`]*)`$", message)
    if match:
        message = message[: match.start()]
        path = _split_path(match.group(1))
    location = _join_location(prefix, path)

    unknown = re.match(r"Object contains unknown field `([^`]*)`", message)
    if unknown and struct is not None:
        fields = msgspec.structs.fields(_struct_at(struct, path))
        allowed = sorted(field.encode_name for field in fields if field.encode_name != "baseDir")
        close = difflib.get_close_matches(unknown.group(1), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(allowed)}"
        raise ConfigError(f"{source}: unknown key '{unknown.group(1)}' {_where('under', location)}{hint}")
    if key_match:
        raise ConfigError(f"{source}: invalid key {_where('under', location)}: {_plain_message(message)}")
    raise ConfigError(
        f"{source}: invalid value {_where('at', location)}{_describe_value(raw, path)}: {_plain_message(message)}"
    )


def _struct_at(struct: type, path: list[str | int]) -> type:
    current = struct
    for part in path:
        for field in msgspec.structs.fields(current):
            if field.encode_name == part and isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
                current = field.type
                break
    return current


def _check_entry(value: Any, value_type: Any, location: str, source: str) -> None:
    try:
        msgspec.convert(value, value_type)
    except msgspec.ValidationError as error:
        _raise_validation(error, value, location, source)


def _check_mappings(provider: str, raw: dict, source: str) -> None:
    """Check `timeouts`, `driver.commands` and `driver.env` of a provider entry by entry.

    msgspec reports an invalid dict value without its key, so these mappings are
    checked before the provider as a whole, and an error names the exact key.
    """
    location = f"providers.{provider}"
    per_type = (
        ("timeouts", PositiveSeconds),
        ("onInterrupt", InterruptAction),
        ("maxRetries", Annotated[int, msgspec.Meta(ge=0, le=100)]),
    )
    for name, value_type in per_type:
        mapping = raw.get(name)
        if not isinstance(mapping, dict):
            continue
        for key, value in mapping.items():
            if key not in TaskType.__members__.values():
                close = difflib.get_close_matches(str(key), list(TaskType), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"{source}: unknown task type {key!r} at {location}.{name}.{key}{_describe_value(value, [])}: "
                    f"allowed task types are {TASK_TYPE_NAMES}{hint}"
                )
            if name == "onInterrupt" and value not in INTERRUPT_ACTIONS:
                raise ConfigError(
                    f"{source}: invalid value at {location}.{name}.{key} ({value!r}): "
                    f"expected one of {', '.join(INTERRUPT_ACTIONS)}"
                )
            _check_entry(value, value_type, f"{location}.{name}.{key}", source)

    driver = raw.get("driver")
    if not isinstance(driver, dict):
        return
    for name, value_type in (("commands", list[str]), ("probes", list[str]), ("env", str)):
        mapping = driver.get(name)
        if not isinstance(mapping, dict):
            continue
        for key, value in mapping.items():
            if not isinstance(key, str):
                received = RECEIVED_TYPE_WORDS.get(_msgspec_type_name(key), type(key).__name__)
                raise ConfigError(
                    f"{source}: invalid key {key!r} under {location}.driver.{name}: expected a string, got {received}"
                )
            _check_entry(value, value_type, f"{location}.driver.{name}.{key}", source)


def _msgspec_type_name(value: Any) -> str:
    """Return the name that msgspec's messages use for the type of a YAML scalar."""
    if value is None:
        return "null"
    return type(value).__name__


def _masked_url(url: str) -> str:
    """Return `url` with its password as ***, also when the scheme is missing."""
    if "://" in url:
        return redact_url(url)
    # redact_url leaves a URL without a scheme unchanged, so give it a stand-in scheme.
    return redact_url("x://" + url)[len("x://") :]


def _check_redis_url(url: str, subject: str) -> None:
    """Raise ConfigError unless `url` is a Redis URL that shared.redis_client.connect accepts.

    `subject` starts the message and names where the URL came from. Nothing connects here.
    """
    scheme, separator, _rest = url.partition("://")
    if not separator or scheme.lower() not in REDIS_URL_SCHEMES:
        raise ConfigError(f"{subject} (value {_masked_url(url)!r}): {REDIS_URL_RULE}")
    try:
        parse_redis_url(url)
    except ValueError as exc:
        raise ConfigError(f"{subject} (value {_masked_url(url)!r}): {exc}") from None


def _check_database_url(url: str, subject: str) -> None:
    """Raise ConfigError unless `url` has a scheme that the SQL store accepts.

    The rest of the URL is checked when the store opens it.
    """
    if not url.lower().startswith(DATABASE_URL_PREFIXES):
        raise ConfigError(f"{subject} (value {_masked_url(url)!r}): expected one of these forms: {DATABASE_URL_FORMS}")


def _check_health(health: HealthConfig, source: str) -> None:
    """Raise ConfigError unless `health.address` is an IP address that may be used.

    The endpoint has no authentication, so an address outside loopback needs
    `allowNonLoopback: true`. Only the text is checked here, and nothing is bound.
    """
    try:
        address = ipaddress.ip_address(health.address)
    except ValueError:
        raise ConfigError(
            f"{source}: invalid value at health.address (value {health.address!r}): "
            f"expected an IP address such as 127.0.0.1 or ::1"
        ) from None
    if not address.is_loopback and not health.allow_non_loopback:
        raise ConfigError(
            f"{source}: invalid value at health.address (value {health.address!r}): the health endpoint has no "
            f"authentication, so by default it listens only on loopback addresses (127.0.0.1, ::1); to listen on "
            f"{health.address}, set health.allowNonLoopback: true and let only trusted networks reach the port"
        )


def _check_argv_mapping(mapping: dict[str, list[str]], location: str, source: str) -> None:
    """Check a task type -> argv mapping of the command driver (`commands` or `probes`)."""
    for type_name, argv in mapping.items():
        if type_name not in TaskType.__members__.values():
            allowed = ", ".join(TaskType)
            raise ConfigError(f"{source}: unknown task type '{type_name}' under {location}; allowed: {allowed}")
        if not argv or not all(isinstance(arg, str) and arg for arg in argv):
            raise ConfigError(f"{source}: {location}.{type_name} must be a non-empty list of non-empty strings")
        for arg in argv:
            for name in PLACEHOLDER_PATTERN.findall(arg):
                if name not in PLACEHOLDERS:
                    allowed = ", ".join("{" + item + "}" for item in PLACEHOLDERS)
                    raise ConfigError(
                        f"{source}: unknown placeholder '{{{name}}}' in {location}.{type_name}; allowed: {allowed}"
                    )
                if arg != "{" + name + "}":
                    # Substituting inside a longer argument would let an id change its meaning.
                    raise ConfigError(
                        f"{source}: placeholder '{{{name}}}' in {location}.{type_name} argument {arg!r} "
                        f"must be a whole argument: write it as a separate list item, or read the value from "
                        f"the task JSON on stdin or the TASKVISOR_* environment variables"
                    )


def _check_driver(provider: str, driver: DriverConfig, source: str) -> None:
    location = f"providers.{provider}.driver"
    if driver.type == "command":
        if not driver.commands:
            raise ConfigError(f"{source}: {location}.commands is empty: give an argv list for each task type it runs")
        _check_argv_mapping(driver.commands, f"{location}.commands", source)
        _check_argv_mapping(driver.probes, f"{location}.probes", source)
    elif driver.type == "docker":
        # Imported here because worker.drivers imports this module.
        from worker.drivers.docker import DockerOptionsError, parse_options

        try:
            parse_options(driver.options)
        except DockerOptionsError as error:
            raise ConfigError(f"{source}: {error.describe(f'{location}.options')}") from None
    elif not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", driver.type):
        raise ConfigError(
            f"{source}: invalid value at {location}.type ({driver.type!r}): "
            f"expected 'command' or a Python class as 'module:Class' (or 'docker')"
        )


def parse_provider(provider: str, raw: Any, source: str) -> ProviderConfig:
    if not PROVIDER_ID_PATTERN.match(str(provider)):
        raise ConfigError(f"{source}: invalid provider id {provider!r}: expected 1-64 characters of A-Za-z0-9._-")
    if isinstance(raw, dict):
        _check_mappings(provider, raw, source)
    try:
        settings = msgspec.convert(raw, ProviderConfig)
    except msgspec.ValidationError as error:
        _raise_validation(error, raw, f"providers.{provider}", source, ProviderConfig)
    _check_driver(provider, settings.driver, source)
    if settings.retry_backoff_cap < settings.retry_backoff_base:
        raise ConfigError(
            f"{source}: providers.{provider}.retryBackoffCap ({settings.retry_backoff_cap:g}) is less than "
            f"retryBackoffBase ({settings.retry_backoff_base:g}): the cap must be at least the first delay"
        )
    if 0 < settings.max_worker_memory_mb < MIN_WORKER_MEMORY_MB:
        raise ConfigError(
            f"{source}: invalid value at providers.{provider}.maxWorkerMemoryMB (value {settings.max_worker_memory_mb}): "
            f"expected 0 (no limit) or at least {MIN_WORKER_MEMORY_MB}, because a worker uses about 40 MiB "
            f"before its first task and would be replaced after every task"
        )
    return settings


def parse_config(raw: Any, source: str, base_dir: str) -> Config:
    """Validate a decoded YAML document and return the Config, raising ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if "baseDir" in raw:
        raise ConfigError(f"{source}: unknown key 'baseDir' at the top level")
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as error:
        _raise_validation(error, raw, "", source, Config)
    if not isinstance(config.providers, dict):
        raise ConfigError(f"{source}: 'providers' must be a mapping of provider id to settings")
    _check_redis_url(config.redis.url, f"{source}: invalid value at redis.url")
    _check_database_url(config.database.url, f"{source}: invalid value at database.url")
    _check_health(config.health, source)
    if 0 < config.redis.events_max_len < 1000:
        raise ConfigError(
            f"{source}: invalid value at redis.eventsMaxLen ({config.redis.events_max_len}): "
            f"expected 0 (no cap) or at least 1000"
        )
    if 0 < config.supervisor.retention < MIN_RETENTION_SECONDS:
        raise ConfigError(
            f"{source}: invalid value at supervisor.retention (value {config.supervisor.retention:g}): expected 0 "
            f"(keep finished tasks forever) or at least {MIN_RETENTION_SECONDS} seconds (1 hour), so that panels "
            f"can read a task's result before it is deleted"
        )

    providers = {str(name): parse_provider(str(name), value, source) for name, value in config.providers.items()}
    supervisor = config.supervisor
    if not supervisor.name:
        supervisor = msgspec.structs.replace(supervisor, name=default_supervisor_name())
    return msgspec.structs.replace(config, providers=providers, supervisor=supervisor, base_dir=base_dir)


def default_supervisor_name() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "taskvisor"


def read_config_document(file: Path) -> dict:
    """Return the YAML document of a config file as a mapping, raising ConfigError."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {file} not found: check --config or TASKVISOR_CONFIG") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file} could not be read: {exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        _name_yaml_marks(exc, str(file))
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level, got {type(document).__name__}")
    return document


def load_config(path: str | os.PathLike | None) -> Config:
    """Read and validate the YAML file at `path`; None gives the defaults with no providers."""
    if path is None:
        return parse_config({}, "(defaults)", os.getcwd())
    file = Path(path)
    return parse_config(read_config_document(file), str(file), str(file.resolve().parent))


def _name_yaml_marks(error: yaml.YAMLError, name: str) -> None:
    """Put the file name in place of `<unicode string>` in a PyYAML error's positions."""
    if isinstance(error, yaml.MarkedYAMLError):
        for mark in (error.context_mark, error.problem_mark):
            if mark is not None:
                mark.name = name
    elif isinstance(error, yaml.reader.ReaderError):
        error.name = name


def apply_overrides(config: Config, redis_url: str | None = None, database_url: str | None = None) -> Config:
    """Return `config` with the URLs given on the command line or in the environment.

    Raises ConfigError if a given URL is one that taskvisor cannot use.
    """
    if redis_url:
        _check_redis_url(redis_url, "invalid value of --redis-url or TASKVISOR_REDIS_URL")
        config = msgspec.structs.replace(config, redis=msgspec.structs.replace(config.redis, url=redis_url))
    if database_url:
        _check_database_url(database_url, "invalid value of --database-url or TASKVISOR_DATABASE_URL")
        config = msgspec.structs.replace(config, database=msgspec.structs.replace(config.database, url=database_url))
    return config
