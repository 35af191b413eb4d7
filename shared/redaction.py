"""Replacement of secrets by *** before anything leaves a worker.

A field is secret when its name, lower-cased, contains one of the secret words
(`password`, `secret`, `token`, plus the config's `secretFields`). Besides masking
those fields, `Redactor.scrub` replaces the secret values themselves wherever they
appear in free text, such as a command's stderr that echoes a new password.
"""

from collections.abc import Iterable
from typing import Any

DEFAULT_SECRET_WORDS = ("password", "passwd", "secret", "token")
MASK = "***"
# Shorter values are not scrubbed from free text: masking every "ab" would wreck messages.
MIN_SCRUBBED_LENGTH = 4


class Redactor:
    def __init__(self, extra_words: Iterable[str] = ()) -> None:
        words = {word.lower() for word in DEFAULT_SECRET_WORDS}
        words.update(word.lower() for word in extra_words if word)
        self.words = tuple(sorted(words))

    def is_secret(self, name: str) -> bool:
        lowered = name.lower()
        return any(word in lowered for word in self.words)

    def redact(self, value: Any) -> Any:
        """Return a copy of a JSON-like value with every secret field's value masked."""
        if isinstance(value, dict):
            return {
                key: (MASK if self.is_secret(str(key)) else self.redact(item)) for key, item in value.items()
            }
        if isinstance(value, list):
            return [self.redact(item) for item in value]
        return value

    def secret_values(self, value: Any) -> list[str]:
        """Return the string forms of every secret field's value, longest first."""
        found: list[str] = []
        self._collect(value, found, inside_secret=False)
        unique = {item for item in found if len(item) >= MIN_SCRUBBED_LENGTH}
        return sorted(unique, key=len, reverse=True)

    def _collect(self, value: Any, found: list[str], inside_secret: bool) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                self._collect(item, found, inside_secret or self.is_secret(str(key)))
        elif isinstance(value, list):
            for item in value:
                self._collect(item, found, inside_secret)
        elif inside_secret and value is not None and not isinstance(value, bool):
            found.append(str(value))

    @staticmethod
    def scrub(text: str, secrets: list[str]) -> str:
        """Replace each secret value that occurs in `text` by the mask."""
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def redact_url(url: str) -> str:
    """Return `url` with the password replaced by ***.

    This works on malformed URLs too: everything between the first ':' of the user part and
    the last '@' counts as the password, so an unescaped '@' or '/' in it is hidden as well.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    at = rest.rfind("@")
    if at < 0:
        return url
    user_info = rest[:at]
    user, colon, _password = user_info.partition(":")
    if not colon:
        return url
    return f"{scheme}://{user}:***{rest[at:]}"
