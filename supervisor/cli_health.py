"""`taskvisor health`: ask a running supervisor's health endpoint whether it is ready.

The command contacts exactly one URL: `--url`, or the one built from the `health`
section of the config (http://127.0.0.1:9180 by default). It ignores proxy
environment variables and follows no redirects, so no other host is contacted.
"""

import http.client
import ipaddress
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import click
import orjson

from shared.errors import ConfigError
from shared.settings import load_config

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 2

# Loopback address to connect to when the endpoint listens on a wildcard address.
WILDCARD_TARGETS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        # Returning None makes urllib raise HTTPError for the 3xx response.
        return None


def _unreachable(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_UNREACHABLE)


def url_from_config(config_path: str | None) -> str:
    """Return the endpoint's base URL from the config's health section; exits with 2 when there is none."""
    try:
        health = load_config(config_path).health
    except ConfigError as exc:
        _unreachable(str(exc))
    source = config_path or "the default configuration"
    if not health.enabled:
        _unreachable(f"health.enabled is false in {source}, so the supervisor runs no health endpoint")
    if health.port == 0:
        _unreachable(
            f"health.port is 0 in {source}, so the supervisor chose a free port at start: pass --url with the URL "
            f"from its log line 'health endpoint listening url=...'"
        )
    host = WILDCARD_TARGETS.get(str(ipaddress.ip_address(health.address)), health.address)
    return f"http://[{host}]:{health.port}" if ":" in host else f"http://{host}:{health.port}"


def readyz_url(base_url: str) -> str:
    """Return the /readyz URL of a base URL; exits with 2 when the URL is not http or https."""
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        _unreachable(f"invalid value of --url ({base_url!r}): expected an http:// URL such as http://127.0.0.1:9180")
    if parts.path.rstrip("/").endswith("/readyz"):
        return base_url
    return base_url.rstrip("/") + "/readyz"


def fetch(url: str, timeout: float) -> tuple[int, bytes]:
    """GET `url` and return the status and body; raises OSError when the connection fails."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@click.command()
@click.option("--config", "config_path", envvar="TASKVISOR_CONFIG", type=click.Path(dir_okay=False),
              help="YAML config file whose health section gives the URL [env TASKVISOR_CONFIG].")
@click.option("--url", "base_url",
              help="Base URL of the health endpoint, such as http://127.0.0.1:9180 [default: from health.address "
                   "and health.port of the config].")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 300),
              help="Seconds to wait for the response.")
@click.option("--json", "as_json", is_flag=True, help="Print the /readyz response body as JSON.")
def health(config_path: str | None, base_url: str | None, timeout: float, as_json: bool) -> None:
    """Print whether the supervisor is ready, with the reasons when it is not.

    Exit code 0: ready. 1: not ready. 2: the endpoint could not be reached or did
    not respond like a taskvisor health endpoint.
    """
    url = readyz_url(base_url or url_from_config(config_path))
    try:
        code, body = fetch(url, timeout)
    except (OSError, http.client.HTTPException) as exc:
        # URLError, a subclass of OSError, wraps the socket error in `reason`.
        reason = getattr(exc, "reason", exc)
        _unreachable(
            f"cannot reach the health endpoint at {url}: {reason}. Check that the supervisor runs with "
            f"health.enabled, and that health.address and health.port (or --url) match its log line "
            f"'health endpoint listening url=...'"
        )
    try:
        verdict = orjson.loads(body)
        ready, reasons = verdict["ready"], verdict["reasons"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        verdict = None
    if verdict is None or code not in (200, 503) or not isinstance(ready, bool) or not isinstance(reasons, list):
        _unreachable(
            f"{url} returned HTTP {code} without a taskvisor readiness verdict: check that the URL points at "
            f"the health endpoint of a taskvisor supervisor"
        )

    if as_json:
        click.echo(orjson.dumps(verdict).decode())
    elif ready:
        click.echo(f"ready ({url})")
    else:
        click.echo(f"not ready ({url}):")
        for reason in reasons:
            click.echo(f"  - {reason}")
    sys.exit(EXIT_READY if ready else EXIT_NOT_READY)
