"""Provider settings changed at run time through Redis, merged over the config file.

Each provider may have a settings hash, `<prefix>:{<provider>}:settings`, whose fields
are provider keys of the config file (`maxConcurrentTasks`, `timeouts`, ...) plus
`paused` and `removed`. Every value is JSON text (`4`, `true`, `{"create": 600}`), so
any Redis client can write it. A field in the hash wins over the same key in the
file; deleting the field returns to the file's value. Providers that exist only in
Redis are listed in the set `<prefix>:providers`. After a change, a notice with the
provider id on the channel `<prefix>:config` makes the supervisor apply it at once.
Without the notice, the change applies within a few seconds.
"""

import copy
from typing import Any

import orjson
import redis

from shared.errors import ConfigError
from shared.keys import PROVIDER_ID_PATTERN, Keys
from shared.settings import ProviderConfig, parse_provider

# Keys of a provider that the settings hash may set, besides `paused` and `removed`.
PROVIDER_KEYS = (
    "allowConcurrentTasks", "maxConcurrentTasks", "taskPollInterval", "enableTaskPolling", "timeouts", "driver",
    "onInterrupt", "maxInterruptedRuns", "maxRetries", "retryBackoffBase", "retryBackoffCap",
    "maxTasksPerWorker", "maxWorkerMemoryMB",
)  # fmt: skip
STATE_KEYS = ("paused", "removed")
SOURCE = "redis provider settings"


def settings_key(keys: Keys, provider: str) -> str:
    return f"{keys.prefix}:{{{provider}}}:settings"


def providers_set_key(keys: Keys) -> str:
    return f"{keys.prefix}:providers"


def config_channel(keys: Keys) -> str:
    return f"{keys.prefix}:config"


def parse_value(name: str, text: str) -> Any:
    """Decode one settings field, raising ConfigError that names the field and value."""
    if name not in PROVIDER_KEYS and name not in STATE_KEYS:
        allowed = ", ".join(PROVIDER_KEYS + STATE_KEYS)
        raise ConfigError(f"{SOURCE}: unknown key '{name}'; allowed: {allowed}")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ConfigError(
            f"{SOURCE}: value of '{name}' is not JSON ({text[:80]!r}): write numbers and true/false bare, "
            f"and mappings as JSON objects"
        ) from None
    if name in STATE_KEYS and not isinstance(value, bool):
        raise ConfigError(f"{SOURCE}: value of '{name}' must be true or false, got {text[:80]!r}")
    return value


def read_overrides(client: redis.Redis, keys: Keys, file_providers: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Return (provider -> decoded settings fields, provider -> error) from Redis."""
    added = {member.decode() if isinstance(member, bytes) else member for member in client.smembers(providers_set_key(keys))}
    provider_ids = sorted(set(file_providers) | {item for item in added if PROVIDER_ID_PATTERN.match(item)})
    pipe = client.pipeline(transaction=False)
    for provider in provider_ids:
        pipe.hgetall(settings_key(keys, provider))
    overrides: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for provider, raw in zip(provider_ids, pipe.execute(), strict=True):
        fields: dict[str, Any] = {}
        for name_bytes, value_bytes in raw.items():
            name = name_bytes.decode("utf-8", "replace")
            try:
                fields[name] = parse_value(name, value_bytes.decode("utf-8", "replace"))
            except ConfigError as exc:
                earlier = errors.get(provider)
                errors[provider] = f"{earlier}; {exc}" if earlier else f"{provider}: {exc}"
        if fields or provider in added:
            overrides[provider] = fields
    return overrides, errors


def merge_provider(provider: str, file_raw: dict | None, override: dict | None) -> ProviderConfig | None:
    """Return the provider's effective settings, None when it is removed or defined nowhere.

    Raises ConfigError when the merged settings are invalid.
    """
    override = override or {}
    if override.get("removed") is True:
        return None
    if file_raw is None and not override:
        return None
    raw = copy.deepcopy(file_raw) if isinstance(file_raw, dict) else {}
    for name in PROVIDER_KEYS:
        if name in override:
            raw[name] = override[name]
    if "paused" in override:
        raw["paused"] = override["paused"]
    return parse_provider(provider, raw, SOURCE if override else "config file")


def merge_providers(
    file_providers: dict[str, Any], overrides: dict[str, dict], previous: dict[str, ProviderConfig]
) -> tuple[dict[str, ProviderConfig], dict[str, str]]:
    """Merge the file's raw provider mappings with the Redis settings of every provider.

    A provider whose merged settings are invalid keeps its `previous` settings (or stays
    absent), and its error is returned, so one bad write never stops the others.
    """
    merged: dict[str, ProviderConfig] = {}
    errors: dict[str, str] = {}
    for provider in sorted(set(file_providers) | set(overrides)):
        try:
            settings = merge_provider(provider, file_providers.get(provider), overrides.get(provider))
        except ConfigError as exc:
            errors[provider] = str(exc)
            settings = previous.get(provider)
        if settings is not None:
            merged[provider] = settings
    return merged, errors
