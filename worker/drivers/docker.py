"""The `docker` driver: runs instance operations on containers through the Docker Engine API.

Docker and Podman both serve this API. Each instance is one container whose name is the
instance id. The driver speaks HTTP/1.1 with `http.client` over a socket that it connects
itself, to a unix socket or a TCP port given as `driver.options.endpoint`. It opens one
connection per API call and waits for each response in steps of POLL_SECONDS, so a stop
request (timeout, cancel or shutdown) ends the task within about that time.

The driver labels every container it creates with the id of the task that created it
(LABEL_TASK). `probe()` uses the label to tell whether an interrupted create or reset
took effect.
"""

import difflib
import errno
import hashlib
import http.client
import logging
import math
import os
import re
import select
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.errors import TaskFailed
from worker.drivers.base import Driver, ProbeAnswer, TaskContext
from worker.drivers.command import stop_description

log = logging.getLogger(__name__)

# Maximum wait on the engine before `context.cancelled` is checked again.
POLL_SECONDS = 0.1
# An engine response larger than this is rejected. Container inspect data is a few KiB.
MAX_REPLY_BYTES = 8 * 1024 * 1024
# The part of an engine's error message that goes into the task's error.
MAX_ERROR_MESSAGE_CHARS = 1000
# stderr and stdout kept from an exec, for the error message.
EXEC_OUTPUT_TAIL_BYTES = 2048
# Seconds kept between the engine's stop timeout `t` and the task's deadline, so the engine
# kills a container that ignores SIGTERM before the task times out.
STOP_DEADLINE_MARGIN = 1.0

LABEL_TASK = "taskvisor.task"
# Names of the variables that data.env set, comma-separated. A reset copies only these from
# the container's environment, because the engine and the image add variables of their own.
LABEL_ENV_NAMES = "taskvisor.env"
# "true" on a container that a reset must also start, because the container it replaced was running.
LABEL_RESET_START = "taskvisor.reset-start"

# Docker's rule for container names, which Podman also accepts.
CONTAINER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]+$")
CONTAINER_NAME_RULE = "2-128 characters of A-Za-z0-9_.- that start with a letter or digit"
NAME_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NETWORK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
API_VERSION_PATTERN = re.compile(r"^1\.\d{1,3}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}$")
MEMORY_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)([bkmgt]?)$", re.IGNORECASE)
MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# Docker's minimum memory limit. Podman 4.3 accepts smaller values.
MIN_MEMORY_BYTES = 6 * 1024**2
MAX_MEMORY_BYTES = 2**63 - 1
# Docker rejects NanoCpus below 0.01 CPU.
MIN_CPUS = 0.01
MAX_SECONDS = 3600

CREATE_FIELDS = ("image", "memory", "cpus", "env", "command")
PASSWORD_FIELDS = ("username", "password")
OPTION_NAMES = ("endpoint", "apiVersion", "requestTimeout", "stopTimeout", "network", "namePrefix")
ENDPOINT_RULE = "expected unix:///absolute/path.sock or tcp://host:port (TLS is not supported)"


class DockerOptionsError(ValueError):
    """Invalid `driver.options` entry of a docker provider, whose message `describe()` builds."""

    def __init__(self, key: str, value: Any, rule: str, kind: str = "invalid") -> None:
        super().__init__(f"{kind} option {key!r}: {rule}")
        self.key = key
        self.value = value
        self.rule = rule
        self.kind = kind

    def describe(self, location: str) -> str:
        """Return the message for the options found at `location`, such as providers.p.driver.options."""
        if self.kind == "unknown":
            return f"unknown key {self.key!r} under {location}; {self.rule}"
        if self.kind == "missing":
            return f"missing required key {self.key!r} under {location}: {self.rule}"
        return f"invalid value at {location}.{self.key} (value {self.value!r}): {self.rule}"


@dataclass(frozen=True)
class DockerOptions:
    """The checked `driver.options` of a docker provider."""

    # ("unix", path) or ("tcp", host, port)
    address: tuple
    endpoint: str
    # "/v1.41" when apiVersion is set, or empty for the engine's own current version
    path_prefix: str = ""
    request_timeout: float = 30.0
    stop_timeout: int = 10
    network: str | None = None
    name_prefix: str = "taskvisor-"


def parse_options(options: Any) -> DockerOptions:
    """Check a docker provider's `driver.options` and return them, raising DockerOptionsError."""
    if not isinstance(options, dict):
        raise DockerOptionsError("", options, "expected a mapping")
    for key in options:
        if key not in OPTION_NAMES:
            close = difflib.get_close_matches(str(key), OPTION_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(OPTION_NAMES)}"
            raise DockerOptionsError(str(key), options[key], hint, kind="unknown")
    if "endpoint" not in options:
        raise DockerOptionsError("endpoint", None, f"give the engine's API socket: {ENDPOINT_RULE}", kind="missing")

    endpoint = options["endpoint"]
    settings: dict[str, Any] = {"address": parse_endpoint(endpoint), "endpoint": endpoint}
    if "apiVersion" in options:
        version = options["apiVersion"]
        if not isinstance(version, str) or not API_VERSION_PATTERN.match(version):
            raise DockerOptionsError("apiVersion", version, "expected an API version as a string, such as '1.41'")
        settings["path_prefix"] = f"/v{version}"
    if "requestTimeout" in options:
        settings["request_timeout"] = parse_seconds("requestTimeout", options["requestTimeout"])
    if "stopTimeout" in options:
        value = options["stopTimeout"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SECONDS:
            rule = f"expected a whole number of seconds from 0 to {MAX_SECONDS}"
            raise DockerOptionsError("stopTimeout", value, rule)
        settings["stop_timeout"] = value
    for key, attribute, pattern, rule in (
        ("network", "network", NETWORK_PATTERN, "expected a network mode or name such as none, bridge or host"),
        ("namePrefix", "name_prefix", NAME_PREFIX_PATTERN,
         "expected 1-64 characters of A-Za-z0-9_.- that start with a letter or digit"),
    ):  # fmt: skip
        if key in options:
            value = options[key]
            if not isinstance(value, str) or not pattern.match(value):
                raise DockerOptionsError(key, value, rule)
            settings[attribute] = value
    return DockerOptions(**settings)


def parse_endpoint(endpoint: Any) -> tuple:
    """Return ("unix", path) or ("tcp", host, port) for an endpoint URL, raising DockerOptionsError."""
    if not isinstance(endpoint, str):
        raise DockerOptionsError("endpoint", endpoint, ENDPOINT_RULE)
    scheme, separator, rest = endpoint.partition("://")
    if separator and scheme == "unix":
        if not rest.startswith("/") or "\0" in rest:
            raise DockerOptionsError("endpoint", endpoint, ENDPOINT_RULE)
        if len(rest.encode()) > 107:
            # The kernel limits a unix socket path to 108 bytes, including the final NUL.
            raise DockerOptionsError("endpoint", endpoint, "the socket path is longer than 107 bytes")
        return ("unix", rest)
    if separator and scheme in ("tcp", "http"):
        try:
            parts = urllib.parse.urlsplit(f"http://{rest}")
            port = parts.port
        except ValueError:
            raise DockerOptionsError("endpoint", endpoint, ENDPOINT_RULE) from None
        if parts.hostname and port and parts.path in ("", "/") and not parts.query and not parts.username:
            return ("tcp", parts.hostname, port)
    raise DockerOptionsError("endpoint", endpoint, ENDPOINT_RULE)


def parse_seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SECONDS:
        raise DockerOptionsError(key, value, f"expected a number of seconds greater than 0 and at most {MAX_SECONDS}")
    return float(value)


@dataclass
class ContainerSpec:
    """Image, limits and process of a container to create."""

    image: str
    memory: int | None = None
    nano_cpus: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    # labels copied from a container that a reset replaces
    labels: dict[str, str] = field(default_factory=dict)


def parse_create_data(data: Any) -> ContainerSpec:
    """Check a create task's `data` and return the container spec, raising TaskFailed with the bad field."""
    if not isinstance(data, dict):
        raise TaskFailed("invalid data: expected a JSON object with at least 'image'")
    reject_unknown_fields(data, CREATE_FIELDS)
    image = data.get("image")
    if image is None:
        raise TaskFailed("data.image is missing: give the image to create the container from, such as 'debian:12'")
    if not isinstance(image, str) or not image or any(char.isspace() for char in image):
        raise TaskFailed(f"invalid data.image (value {image!r}): expected an image name such as 'debian:12'")

    spec = ContainerSpec(image=image)
    if data.get("memory") is not None:
        spec.memory = parse_memory(data["memory"])
    if data.get("cpus") is not None:
        spec.nano_cpus = parse_cpus(data["cpus"])
    if data.get("env") is not None:
        spec.env = parse_env(data["env"])
    if data.get("command") is not None:
        command = data["command"]
        if not isinstance(command, list) or not command or not all(isinstance(arg, str) for arg in command):
            raise TaskFailed(f"invalid data.command (value {command!r}): expected a non-empty list of strings")
        spec.command = command
    return spec


def reject_unknown_fields(data: dict, allowed: tuple[str, ...]) -> None:
    for name in data:
        if name not in allowed:
            raise TaskFailed(f"unknown field data.{name}: the docker driver reads only {', '.join(allowed)}")


def parse_memory(value: Any) -> int:
    """Return a memory limit in bytes from an integer of bytes or a string such as '512m'."""
    rule = ("expected a whole number of bytes or a string such as '512m' or '1.5g' "
            "(units b, k, m, g, t are powers of 1024), at least 6m")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TaskFailed(f"invalid data.memory (value {value!r}): {rule}")
    if isinstance(value, int):
        amount = value
    else:
        match = MEMORY_PATTERN.match(value.strip())
        if not match:
            raise TaskFailed(f"invalid data.memory (value {value!r}): {rule}")
        amount = int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
    if not MIN_MEMORY_BYTES <= amount <= MAX_MEMORY_BYTES:
        raise TaskFailed(f"invalid data.memory (value {value!r}): {rule}")
    return amount


def parse_cpus(value: Any) -> int:
    """Return NanoCpus (billionths of a CPU) from a number of CPUs such as 0.5 or 2."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    valid = not isinstance(number, bool) and isinstance(number, int | float) and math.isfinite(number)
    if not valid or number < MIN_CPUS:
        rule = f"expected a number of CPUs of at least {MIN_CPUS}, such as 0.5 or 2"
        raise TaskFailed(f"invalid data.cpus (value {value!r}): {rule}")
    return round(number * 1e9)


def parse_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise TaskFailed(f"invalid data.env: expected a JSON object of variable names to strings, got {kind}")
    for name, text in value.items():
        if not ENV_NAME_PATTERN.match(name):
            rule = "expected letters, digits and _, not starting with a digit"
            raise TaskFailed(f"invalid variable name {name!r} in data.env: {rule}")
        if not isinstance(text, str) or "\0" in text:
            # The value is not shown, because variables can hold secrets.
            kind = type(text).__name__
            raise TaskFailed(f"invalid data.env.{name}: expected a string without NUL characters, got {kind}")
    return dict(value)


def parse_password_data(data: Any) -> tuple[str, str]:
    """Return (username, password) from a reset-password task's `data`. No message shows the password."""
    if not isinstance(data, dict):
        raise TaskFailed("invalid data: expected a JSON object with 'password' and optionally 'username'")
    reject_unknown_fields(data, PASSWORD_FIELDS)
    username = data.get("username", "root")
    if not isinstance(username, str) or not USERNAME_PATTERN.match(username):
        raise TaskFailed(f"invalid data.username (value {username!r}): expected a user name such as root or admin")
    password = data.get("password")
    if password is None:
        raise TaskFailed("data.password is missing: send the new password as a string")
    if not isinstance(password, str) or not password or "\n" in password or "\r" in password or "\0" in password:
        raise TaskFailed("invalid data.password: expected a non-empty string without line breaks or NUL characters")
    return username, password


def generated_name(prefix: str, task_id: str) -> str:
    """Return the container name for a create task without an instance, derived from the task id.

    The name depends only on the task id, so a probe finds the container of an interrupted
    create. Task ids may contain ':', which container names may not, so such ids are
    rewritten and get a hash suffix that keeps two rewritten ids apart.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", task_id)
    if cleaned == task_id:
        return prefix + task_id
    return f"{prefix}{cleaned}-{hashlib.sha256(task_id.encode()).hexdigest()[:8]}"


class EngineClient:
    """HTTP/1.1 calls to the engine, one connection each, that give up when the task must stop.

    A `context` of None makes a call ignore stop requests. It is still bounded by
    `requestTimeout`.
    """

    def __init__(self, options: DockerOptions) -> None:
        self.options = options

    def call(self, method: str, path: str, context: TaskContext | None, action: str, *,
             query: dict | None = None, body: dict | None = None, extra_wait: float = 0.0) -> tuple[int, Any]:
        """Send one request and return (HTTP status, decoded JSON or None).

        `extra_wait` adds seconds to `requestTimeout` for calls that take that long on the
        engine, such as a stop with `t` seconds of grace.
        """
        limit = time.monotonic() + self.options.request_timeout + extra_wait
        payload = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection = self.connection(self.connect(context, limit, action))
        try:
            connection.request(method, self.url(path, query), body=payload, headers=headers)
            self.wait_readable(connection.sock, context, limit, action)
            response = connection.getresponse()
            raw = response.read(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            endpoint = self.options.endpoint
            raise TaskFailed(f"{action} failed: the engine at {endpoint} sent no complete response in time") from None
        except (OSError, http.client.HTTPException) as exc:
            endpoint = self.options.endpoint
            raise TaskFailed(f"{action} failed: the request to the engine at {endpoint} failed: {exc!r}") from None
        finally:
            connection.close()
        if len(raw) > MAX_REPLY_BYTES:
            raise TaskFailed(f"{action} failed: the engine's response is larger than {MAX_REPLY_BYTES} bytes")
        return response.status, decode_reply(raw)

    def url(self, path: str, query: dict | None = None) -> str:
        url = self.options.path_prefix + path
        return f"{url}?{urllib.parse.urlencode(query)}" if query else url

    def connection(self, sock: socket.socket) -> http.client.HTTPConnection:
        """Wrap a connected socket in an HTTPConnection, which then never connects by itself."""
        address = self.options.address
        host = "localhost" if address[0] == "unix" else address[1]
        port = None if address[0] == "unix" else address[2]
        connection = http.client.HTTPConnection(host, port, timeout=self.options.request_timeout)
        connection.sock = sock
        return connection

    def connect(self, context: TaskContext | None, limit: float, action: str) -> socket.socket:
        """Connect to the endpoint without blocking, so a stop request is noticed while connecting."""
        while True:
            sock, target = self.new_socket(action)
            try:
                sock.setblocking(False)
                code = sock.connect_ex(target)
                if code == errno.EAGAIN and sock.family == socket.AF_UNIX:
                    # The engine's listen backlog is full; this attempt failed, so try again shortly.
                    sock.close()
                    self.wait_for(None, context, limit, action, write=False)
                    continue
                if code == errno.EINPROGRESS:
                    self.wait_writable(sock, context, limit, action)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code != 0:
                    raise OSError(code, os.strerror(code))
                sock.settimeout(self.options.request_timeout)
                return sock
            except OSError as exc:
                sock.close()
                endpoint = self.options.endpoint
                raise TaskFailed(f"{action} failed: cannot connect to the engine at {endpoint}: {exc}") from None
            except BaseException:
                sock.close()
                raise

    def new_socket(self, action: str) -> tuple[socket.socket, Any]:
        """Return an unconnected socket for the endpoint and the address to connect it to."""
        address = self.options.address
        if address[0] == "unix":
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address[1]
        try:
            family, kind, protocol, _name, target = socket.getaddrinfo(
                address[1], address[2], type=socket.SOCK_STREAM)[0]
        except OSError as exc:
            endpoint = self.options.endpoint
            raise TaskFailed(f"{action} failed: cannot resolve the engine endpoint {endpoint}: {exc}") from None
        return socket.socket(family, kind, protocol), target

    def wait_readable(self, sock: socket.socket, context: TaskContext | None, limit: float, action: str) -> None:
        """Wait until the engine starts to respond, checking for a stop request every POLL_SECONDS."""
        self.wait_for(sock, context, limit, action, write=False)

    def wait_writable(self, sock: socket.socket, context: TaskContext | None, limit: float, action: str) -> None:
        self.wait_for(sock, context, limit, action, write=True)

    def wait_for(self, sock: socket.socket | None, context: TaskContext | None, limit: float, action: str,
                 write: bool) -> None:
        """Wait until `sock` is ready, or for one POLL_SECONDS step when `sock` is None."""
        while True:
            if context is not None and context.cancelled.is_set():
                raise TaskFailed(f"{action} interrupted because {stop_description(context)}")
            remaining = limit - time.monotonic()
            if remaining <= 0:
                raise TaskFailed(f"{action} failed: the engine at {self.options.endpoint} did not respond in time")
            poller = select.poll()
            if sock is not None:
                poller.register(sock, select.POLLOUT if write else select.POLLIN)
            # POLLHUP and POLLERR also end the wait; the next read or write then reports the error.
            if poller.poll(min(POLL_SECONDS, remaining) * 1000) or sock is None:
                return


def decode_reply(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()


def engine_error(action: str, status: int, reply: Any) -> TaskFailed:
    """Return the TaskFailed for an engine error reply, with the engine's message and the HTTP status."""
    message = reply.get("message") if isinstance(reply, dict) else reply
    text = str(message or "no message")[:MAX_ERROR_MESSAGE_CHARS]
    return TaskFailed(f"{action} failed: the engine returned HTTP {status}: {text}")


class ExecStream:
    """The attached stdin, stdout and stderr of an exec, over a connection that the engine hijacks.

    `POST /exec/{id}/start` with `Upgrade: tcp` turns the connection into a raw stream. The
    client writes stdin and half-closes the connection. The engine sends stdout and stderr
    as frames until the process exits, then closes the connection. Each frame is an 8-byte
    header (stream number, three zero bytes, big-endian length) and the data.
    """

    def __init__(self, client: EngineClient, context: TaskContext, action: str) -> None:
        self.client = client
        self.context = context
        self.action = action
        self.buffer = bytearray()
        self.output = {1: bytearray(), 2: bytearray()}

    def run(self, exec_id: str, stdin: bytes) -> None:
        """Start the exec, write `stdin`, and collect the output tails until the process exits."""
        client = self.client
        limit = time.monotonic() + client.options.request_timeout
        sock = client.connect(self.context, limit, self.action)
        try:
            body = b'{"Detach":false,"Tty":false}'
            head = (f"POST {client.url(f'/exec/{exec_id}/start')} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n").encode()
            sock.sendall(head + body)
            status, headers = self.read_head(sock, limit)
            if status not in (101, 200):
                raise engine_error(self.action, status, decode_reply(self.read_error_body(sock, headers, limit)))
            sock.sendall(stdin)
            sock.shutdown(socket.SHUT_WR)
            while self.receive(sock, limit):
                self.parse_frames()
        except TimeoutError:
            raise TaskFailed(f"{self.action} failed: the engine sent no complete response in time") from None
        except OSError as exc:
            raise TaskFailed(f"{self.action} failed: the exec stream broke: {exc!r}") from None
        finally:
            sock.close()

    def receive(self, sock: socket.socket, limit: float) -> bool:
        """Append the next bytes to the buffer; return False at end of stream."""
        self.client.wait_readable(sock, self.context, limit, self.action)
        chunk = sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read_head(self, sock: socket.socket, limit: float) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536 or not self.receive(sock, limit):
                message = "the engine closed the connection without a valid HTTP response"
                raise TaskFailed(f"{self.action} failed: {message}")
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise TaskFailed(f"{self.action} failed: the engine sent an invalid status line {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def read_error_body(self, sock: socket.socket, headers: dict[str, str], limit: float) -> bytes:
        """Read an error reply's body. Engines send these with Content-Length; without it, read until end of stream."""
        text = headers.get("content-length", "")
        length = int(text) if text.isdigit() else -1
        while (length < 0 or len(self.buffer) < length) and len(self.buffer) <= MAX_REPLY_BYTES:
            if not self.receive(sock, limit):
                break
        return bytes(self.buffer if length < 0 else self.buffer[:length])

    def parse_frames(self) -> None:
        while len(self.buffer) >= 8:
            size = int.from_bytes(self.buffer[4:8], "big")
            if len(self.buffer) < 8 + size:
                return
            stream = self.buffer[0]
            tail = self.output.get(stream)
            if tail is not None:
                tail += self.buffer[8 : 8 + size]
                del tail[:-EXEC_OUTPUT_TAIL_BYTES]
            del self.buffer[: 8 + size]

    def text(self, stream: int) -> str:
        return self.output[stream].decode("utf-8", "replace").strip()


class DockerDriver(Driver):
    """Runs each task type on the container named after the task's instance; see docs/drivers.md."""

    def __init__(self, provider: str, options: dict) -> None:
        super().__init__(provider, options)
        self.settings = parse_options(options)
        self.engine = EngineClient(self.settings)

    # Task types

    def create(self, context: TaskContext) -> dict:
        spec = parse_create_data(context.data)
        name = self.container_name(context)
        container_id = self.create_container(name, spec, context, context.task_id)
        log.info("created container task_id=%s provider=%s instance=%s container_id=%s",
                 context.task_id, context.provider, name, container_id)
        return {"instance": name, "containerId": container_id}

    def start(self, context: TaskContext) -> dict:
        name = self.container_name(context)
        self.start_container(name, context)
        return {"instance": name, "state": self.running_state(name, context)}

    def stop(self, context: TaskContext) -> dict:
        name = self.container_name(context)
        seconds = self.stop_seconds(context)
        action = f"stop container {name}"
        status, reply = self.engine.call("POST", f"/containers/{quote(name)}/stop", context, action,
                                         query={"t": seconds}, extra_wait=seconds)
        if status not in (204, 304):
            raise engine_error(action, status, reply)
        return {"instance": name, "state": self.inspect(name, context)["State"]["Status"]}

    def restart(self, context: TaskContext) -> dict:
        name = self.container_name(context)
        seconds = self.stop_seconds(context)
        action = f"restart container {name}"
        status, reply = self.engine.call("POST", f"/containers/{quote(name)}/restart", context, action,
                                         query={"t": seconds}, extra_wait=seconds)
        if status != 204:
            raise engine_error(action, status, reply)
        return {"instance": name, "state": self.running_state(name, context)}

    def delete(self, context: TaskContext) -> dict:
        """Remove the container, killing it if it runs. An absent container counts as removed, so reruns complete."""
        name = self.container_name(context)
        removed = self.remove_container(name, context)
        log.info("deleted container task_id=%s provider=%s instance=%s existed=%s",
                 context.task_id, context.provider, name, removed)
        return {"instance": name, "removed": removed}

    def reset(self, context: TaskContext) -> dict:
        """Replace the container with a new one from the same image and settings, started if the old one ran."""
        name = self.container_name(context)
        info = self.inspect(name, context)
        spec = spec_from_inspect(info)
        self.require_image(spec.image, name, context)
        was_running = bool(info["State"].get("Running"))

        # From the removal on, the calls ignore stop requests: an interruption now would leave the
        # instance without a container. Removing with force, creating and starting each take well
        # under a second, and requestTimeout still bounds them.
        if context.cancelled.is_set():
            raise TaskFailed(f"reset of container {name} interrupted because {stop_description(context)}")
        context.progress(20, "removing the old container")
        self.remove_container(name, None)
        context.progress(60, "creating the new container")
        labels = {LABEL_RESET_START: "true" if was_running else "false"}
        container_id = self.create_container(name, spec, None, context.task_id, labels)
        if was_running:
            self.start_container(name, None)
        state = self.inspect(name, None)["State"]["Status"]
        log.info("reset container task_id=%s provider=%s instance=%s old_id=%s new_id=%s",
                 context.task_id, context.provider, name, info["Id"], container_id)
        return {"instance": name, "containerId": container_id, "previousContainerId": info["Id"], "state": state}

    def reset_password(self, context: TaskContext) -> dict:
        """Run `chpasswd` in the running container and write `username:password` to its stdin."""
        username, password = parse_password_data(context.data)
        name = self.container_name(context)
        action = f"reset-password in container {name}"
        exec_body = {"AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": False,
                     "User": "0", "Cmd": ["chpasswd"]}
        status, reply = self.engine.call("POST", f"/containers/{quote(name)}/exec", context, action, body=exec_body)
        if status != 201 or not isinstance(reply, dict) or "Id" not in reply:
            raise engine_error(action, status, reply)

        stream = ExecStream(self.engine, context, action)
        stream.run(reply["Id"], f"{username}:{password}\n".encode())
        exit_code = self.exec_exit_code(reply["Id"], context, action)
        if exit_code != 0:
            detail = stream.text(2) or stream.text(1) or "no output"
            raise TaskFailed(f"{action} failed: chpasswd exited with status {exit_code}: {detail}")
        log.info("changed password task_id=%s provider=%s instance=%s username=%s",
                 context.task_id, context.provider, name, username)
        return {"instance": name, "username": username}

    def probe(self, context: TaskContext) -> ProbeAnswer:
        """Tell action an interrupted create, delete or reset did; other task types are safe to run again."""
        name = self.container_name(context)
        info = self.inspect(name, context, missing_ok=True)
        labels = (info or {}).get("Config", {}).get("Labels") or {}
        made_by_task = labels.get(LABEL_TASK) == context.task_id

        if context.task_type == "create":
            if info is None:
                return ProbeAnswer("not_done")
            if made_by_task:
                return ProbeAnswer("completed", {"instance": name, "containerId": info["Id"]})
            return ProbeAnswer("failed", error=f"container {name} exists but task {context.task_id} did not create it")
        if context.task_type == "delete":
            if info is None:
                return ProbeAnswer("completed", {"instance": name, "removed": True})
            return ProbeAnswer("not_done")
        if context.task_type == "reset":
            return probe_reset(name, info, made_by_task, labels)
        return ProbeAnswer("not_done")

    # Steps

    def container_name(self, context: TaskContext) -> str:
        name = context.instance
        if not name and context.task_type == "create":
            name = generated_name(self.settings.name_prefix, context.task_id)
        if not name:
            raise TaskFailed(f"task type {context.task_type} needs an instance: the container name")
        if len(name) > 128 or not CONTAINER_NAME_PATTERN.match(name):
            raise TaskFailed(f"instance {name!r} is not a valid container name: expected {CONTAINER_NAME_RULE}")
        return name

    def create_container(self, name: str, spec: ContainerSpec, context: TaskContext | None, task_id: str,
                         labels: dict[str, str] | None = None) -> str:
        action = f"create container {name}"
        body = container_body(spec, self.settings.network)
        body["Labels"] = {**spec.labels, LABEL_TASK: task_id, LABEL_ENV_NAMES: ",".join(spec.env), **(labels or {})}
        status, reply = self.engine.call("POST", "/containers/create", context, action, query={"name": name}, body=body)
        if status != 201 or not isinstance(reply, dict) or "Id" not in reply:
            raise engine_error(action, status, reply)
        return reply["Id"]

    def start_container(self, name: str, context: TaskContext | None) -> None:
        action = f"start container {name}"
        status, reply = self.engine.call("POST", f"/containers/{quote(name)}/start", context, action)
        if status not in (204, 304):
            raise engine_error(action, status, reply)

    def remove_container(self, name: str, context: TaskContext | None) -> bool:
        """Kill the container, then remove it and its anonymous volumes; return False if it did not exist.

        Podman 4.3 reports success for a forced removal of a container that is still in a
        stop's grace period but leaves its processes running, so a SIGKILL goes first. The
        kill's status is ignored, because a stopped container makes it fail and the removal
        reports any real error.
        """
        action = f"delete container {name}"
        self.engine.call("POST", f"/containers/{quote(name)}/kill", context, action, query={"signal": "KILL"})
        status, reply = self.engine.call("DELETE", f"/containers/{quote(name)}", context, action,
                                         query={"force": "true", "v": "true"})
        if status == 404:
            return False
        if status != 204:
            raise engine_error(action, status, reply)
        return True

    def inspect(self, name: str, context: TaskContext | None, missing_ok: bool = False) -> dict | None:
        action = f"inspect container {name}"
        status, reply = self.engine.call("GET", f"/containers/{quote(name)}/json", context, action)
        if status == 404 and missing_ok:
            return None
        if status != 200 or not isinstance(reply, dict):
            raise engine_error(action, status, reply)
        return reply

    def running_state(self, name: str, context: TaskContext) -> str:
        """Return the state after a start, raising TaskFailed if the container stopped at once."""
        state = self.inspect(name, context)["State"]
        if state.get("Status") == "exited":
            raise TaskFailed(f"container {name} exited right after it started, with exit code {state.get('ExitCode')}")
        return state.get("Status", "")

    def require_image(self, image: str, name: str, context: TaskContext) -> None:
        action = f"reset container {name}"
        status, reply = self.engine.call("GET", f"/images/{quote(image)}/json", context, action)
        if status == 404:
            message = f"image {image} is no longer on the engine, so the container was not changed"
            raise TaskFailed(f"{action} failed: {message}")
        if status != 200:
            raise engine_error(action, status, reply)

    def stop_seconds(self, context: TaskContext) -> int:
        """Return the engine's grace `t`: stopTimeout, cut so that the engine kills before the task times out."""
        remaining = context.deadline - time.monotonic() - STOP_DEADLINE_MARGIN
        return max(0, min(self.settings.stop_timeout, int(remaining)))

    def exec_exit_code(self, exec_id: str, context: TaskContext, action: str) -> int:
        """Return the exit code of a finished exec; the engine can report it a moment after the stream ends."""
        limit = time.monotonic() + self.settings.request_timeout
        while True:
            status, reply = self.engine.call("GET", f"/exec/{exec_id}/json", context, action)
            if status != 200 or not isinstance(reply, dict):
                raise engine_error(action, status, reply)
            if not reply.get("Running") and reply.get("ExitCode") is not None:
                return int(reply["ExitCode"])
            if time.monotonic() > limit:
                raise TaskFailed(f"{action} failed: chpasswd was still running after its output ended")
            if context.cancelled.wait(POLL_SECONDS / 2):
                raise TaskFailed(f"{action} interrupted because {stop_description(context)}")


def quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def container_body(spec: ContainerSpec, network: str | None) -> dict:
    """Return the body of POST /containers/create for `spec`."""
    host_config: dict[str, Any] = {}
    if spec.memory:
        host_config["Memory"] = spec.memory
    if spec.nano_cpus:
        host_config["NanoCpus"] = spec.nano_cpus
    if network:
        host_config["NetworkMode"] = network
    body: dict[str, Any] = {"Image": spec.image, "HostConfig": host_config}
    if spec.env:
        body["Env"] = [f"{name}={value}" for name, value in spec.env.items()]
    if spec.command:
        body["Cmd"] = spec.command
    if spec.entrypoint:
        body["Entrypoint"] = spec.entrypoint
    return body


def spec_from_inspect(info: dict) -> ContainerSpec:
    """Return the spec that recreates a container, read from its inspect data."""
    config = info.get("Config") or {}
    host_config = info.get("HostConfig") or {}
    labels = config.get("Labels") or {}
    env_names = [name for name in labels.get(LABEL_ENV_NAMES, "").split(",") if name]
    current_env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    return ContainerSpec(
        image=config.get("Image") or info.get("Image", ""),
        memory=host_config.get("Memory") or None,
        nano_cpus=host_config.get("NanoCpus") or None,
        env={name: current_env[name] for name in env_names if name in current_env},
        command=config.get("Cmd") or None,
        entrypoint=config.get("Entrypoint") or None,
        labels={key: value for key, value in labels.items() if not key.startswith("taskvisor.")},
    )


def probe_reset(name: str, info: dict | None, made_by_task: bool, labels: dict) -> ProbeAnswer:
    """Return the probe result for an interrupted reset, from the container that now has the name."""
    if info is None:
        return ProbeAnswer("failed", error=(
            f"container {name} does not exist: the interrupted reset may have removed it before it created "
            f"the new one, so create the instance again"))
    if not made_by_task:
        # The old container is still there, so the reset had not removed it yet: running it again is safe.
        return ProbeAnswer("not_done")
    state = info["State"].get("Status", "")
    if labels.get(LABEL_RESET_START) == "true" and state != "running":
        return ProbeAnswer("failed", error=(
            f"the interrupted reset recreated container {name} but did not start it (state {state}): "
            f"send a start task"))
    return ProbeAnswer("completed", {"instance": name, "containerId": info["Id"], "state": state})
