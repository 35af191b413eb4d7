"""Validation of task stream entries, the fields any producer may XADD.

`parse_entry` turns the raw fields of one stream entry into a `TaskSpec`, or raises
`InvalidEntry` with a reason that names the field and the rule it broke. Both the
intake and the workers call it, so an entry is judged the same way everywhere.
"""

import math
import re

import msgspec
import orjson

from shared.errors import InvalidEntry
from shared.states import TaskType

TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
# Plain decimal notation only, so every producer language writes and reads it the same way.
TIMEOUT_PATTERN = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,6})?$")

# Protocol versions: an entry may carry `v` = "<major>" or "<major>.<minor>", and without
# it, it is version 1. A minor version only adds optional fields, which older readers
# ignore, so only the major version decides whether this supervisor can read an entry.
PROTOCOL_VERSION = "1"
SUPPORTED_MAJOR_VERSIONS = (1,)
VERSION_PATTERN = re.compile(r"^([0-9]{1,4})(\.[0-9]{1,4})?$")

MAX_DATA_BYTES = 65536
# A week: a longer task timeout is taken as a unit mistake (milliseconds for seconds).
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600

TYPE_NAMES = ", ".join(task_type.value for task_type in TaskType)


class TaskSpec(msgspec.Struct, frozen=True):
    """A validated task entry. `data` still contains secrets, so it is for the driver only."""

    id: str
    provider: str
    type: TaskType
    instance: str
    user: str
    timeout: float | None
    data: dict
    entry: str


def derive_task_id(provider: str, entry_id: str) -> str:
    """Return the task id of an entry that carries no `id` field."""
    return f"{provider}:{entry_id}"


def _text(fields: dict, name: str) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEntry(f"field '{name}' is not valid UTF-8") from None
    return str(raw)


def _check_pattern(name: str, value: str, pattern: re.Pattern, rule: str) -> str:
    if not pattern.match(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidEntry(f"field '{name}' has invalid value {shown!r}: expected {rule}")
    return value


def check_version(text: str) -> None:
    """Raise InvalidEntry unless `text` names a protocol version this supervisor reads."""
    supported = " or ".join(str(major) for major in SUPPORTED_MAJOR_VERSIONS)
    match = VERSION_PATTERN.match(text)
    if match is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidEntry(
            f"field 'v' has invalid value {shown!r}: expected a protocol version such as 1 or 1.2; "
            f"this supervisor reads version {supported}"
        )
    if int(match.group(1)) not in SUPPORTED_MAJOR_VERSIONS:
        raise InvalidEntry(
            f"field 'v' has unsupported protocol version {text!r}: this supervisor reads version {supported} "
            f"(send v={PROTOCOL_VERSION} or leave the field out), or upgrade taskvisor"
        )


def parse_timeout(text: str) -> float:
    """Parse a timeout in seconds, raising InvalidEntry unless it is a positive decimal number."""
    if not TIMEOUT_PATTERN.match(text):
        raise InvalidEntry(
            f"field 'timeout' has invalid value {text!r}: expected a positive number of seconds such as 300 or 2.5,"
            " written as plain digits with at most 6 after one '.' (no sign, exponent or spaces)"
        )
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise InvalidEntry(f"field 'timeout' has invalid value {text!r}: expected a positive number of seconds")
    if value > MAX_TIMEOUT_SECONDS:
        raise InvalidEntry(
            f"field 'timeout' has invalid value {text!r}: at most {MAX_TIMEOUT_SECONDS} seconds (7 days) is allowed"
        )
    return value


def parse_data(text: str) -> dict:
    if len(text.encode("utf-8")) > MAX_DATA_BYTES:
        raise InvalidEntry(f"field 'data' is larger than the limit of {MAX_DATA_BYTES} bytes")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidEntry(f"field 'data' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidEntry(f"field 'data' must be a JSON object, got {type(value).__name__}")
    return value


def known_task_id(provider: str, entry_id: str, fields: dict) -> str | None:
    """Return the task id of an entry that may be invalid, or None when its `id` is unusable.

    An entry without `id` has the derived id, as a valid entry would.
    """
    raw = fields.get("id", fields.get(b"id"))
    if raw is None or raw in ("", b""):
        return derive_task_id(provider, entry_id)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return None
    return text if TASK_ID_PATTERN.match(text) else None


def parse_entry(provider: str, entry_id: str, fields: dict) -> TaskSpec:
    """Validate one stream entry and return it as a TaskSpec.

    Raises InvalidEntry naming the first field that breaks the contract. Fields the
    contract does not define are ignored, so producers can add their own.
    """
    fields = {(name.decode("utf-8", "replace") if isinstance(name, bytes) else name): value for name, value in fields.items()}
    # The version comes first because it decides how the other fields are read.
    version_text = _text(fields, "v")
    if version_text:
        check_version(version_text)

    task_id = _text(fields, "id")
    if task_id is None or task_id == "":
        task_id = derive_task_id(provider, entry_id)
    else:
        _check_pattern("id", task_id, TASK_ID_PATTERN, "1-64 characters of A-Za-z0-9._:-")

    type_text = _text(fields, "type")
    if not type_text:
        raise InvalidEntry(f"field 'type' is missing: expected one of {TYPE_NAMES}")
    try:
        task_type = TaskType(type_text)
    except ValueError:
        raise InvalidEntry(f"field 'type' has unknown value {type_text!r}: expected one of {TYPE_NAMES}") from None

    instance = _text(fields, "instance") or ""
    if instance:
        _check_pattern("instance", instance, INSTANCE_ID_PATTERN, "1-128 characters of A-Za-z0-9._:@-")
    elif task_type != TaskType.CREATE:
        raise InvalidEntry(f"field 'instance' is missing: it is required for a '{task_type}' task")

    user = _text(fields, "user")
    if not user:
        raise InvalidEntry("field 'user' is missing: expected the id of the user who requested the task")
    _check_pattern("user", user, USER_ID_PATTERN, "1-128 characters of A-Za-z0-9._:@-")

    timeout_text = _text(fields, "timeout")
    timeout = parse_timeout(timeout_text) if timeout_text else None

    data_text = _text(fields, "data")
    data = parse_data(data_text) if data_text else {}

    return TaskSpec(
        id=task_id,
        provider=provider,
        type=task_type,
        instance=instance,
        user=user,
        timeout=timeout,
        data=data,
        entry=entry_id,
    )
