"""Redis connections and consumer groups, the same way for every process.

`redis.url` takes five forms. `redis://`, `rediss://` and `unix://` name one server
and go to redis-py's `Redis.from_url`. `redis+sentinel://` names Redis Sentinel
processes, which tell the client where the current master of a named group is.
`redis+cluster://` names some nodes of a Redis Cluster, from which redis-py learns the
rest. The protocols are redis-py's own: `redis.Sentinel` and `redis.cluster.RedisCluster`.
"""

import logging
import threading
from dataclasses import dataclass
from urllib.parse import unquote

import hiredis
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from shared.process import current_pid

log = logging.getLogger(__name__)


# Seconds a reply may take. Every blocking read taskvisor makes waits at most a few
# seconds, so a longer silence means the server or the network is stuck.
SOCKET_TIMEOUT_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 5
# Seconds a pooled connection may sit idle before redis-py checks it with PING on reuse.
HEALTH_CHECK_INTERVAL_SECONDS = 30

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379
SENTINEL_EXAMPLE = "redis+sentinel://:password@127.0.0.1:26379,127.0.0.1:26380/mymaster/0"
CLUSTER_EXAMPLE = "redis+cluster://:password@127.0.0.1:7000,127.0.0.1:7001"


@dataclass(frozen=True)
class RedisTarget:
    """The topology that a `redis.url` names: one server, a Sentinel-managed master, or a cluster.

    `kind` is "single", or the scheme of the two other forms. `nodes` are the Sentinel
    addresses for a Sentinel URL and the startup nodes for a cluster URL. A
    single-server URL keeps its details in `url` only.
    """

    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> RedisTarget:
    """Split a Redis URL into a RedisTarget without connecting.

    Raises ValueError with the reason and the fix. The message leaves out the URL,
    which may contain a password, so the caller names it in masked form.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or (scheme not in SINGLE_SCHEMES and scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME)):
        expected = ", ".join([*SINGLE_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME])
        raise ValueError(f"unknown scheme '{scheme}': expected one of {expected}")
    if scheme in SINGLE_SCHEMES:
        # This parses the URL and its query arguments without connecting.
        redis.ConnectionPool.from_url(url)
        return RedisTarget(kind="single", url=url)

    location, _, query = rest.partition("?")
    if query:
        # The query is not shown, because it could hold a password.
        raise ValueError(f"{scheme}:// takes no query arguments such as ?db=1; remove everything from the '?' on")
    authority, _, path = location.partition("/")
    username, password, hosts = _split_user_info(authority)
    if scheme == SENTINEL_SCHEME:
        nodes = _parse_addresses(hosts, DEFAULT_SENTINEL_PORT, SENTINEL_EXAMPLE)
        master_name, db = _parse_sentinel_path(path)
        return RedisTarget(SENTINEL_SCHEME, url, nodes, master_name, db, username, password)
    nodes = _parse_addresses(hosts, DEFAULT_CLUSTER_PORT, CLUSTER_EXAMPLE)
    if path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, but the URL names '/{path}'; remove it or write '/0'")
    return RedisTarget(CLUSTER_SCHEME, url, nodes, username=username, password=password)


def _split_user_info(authority: str) -> tuple[str | None, str | None, str]:
    """Return (username, password, host list) of `[[username]:password@]hosts`, percent-decoded."""
    user_info, at, hosts = authority.rpartition("@")
    if not at:
        return None, None, authority
    # As in redis-py's redis:// URLs, `name@host` names a user without a password.
    username, _, password = user_info.partition(":")
    return unquote(username) or None, unquote(password) or None, hosts


def _parse_addresses(hosts: str, default_port: int, example: str) -> tuple[tuple[str, int], ...]:
    if not hosts:
        raise ValueError(f"no address given: list host:port pairs separated by commas, as in {example}")
    nodes = []
    for address in hosts.split(","):
        if not address:
            raise ValueError(
                f"empty address in '{hosts}': separate host:port pairs with single commas, as in {example}"
            )
        nodes.append(_parse_address(address, default_port))
    return tuple(nodes)


def _parse_address(address: str, default_port: int) -> tuple[str, int]:
    if address.startswith("["):
        # An IPv6 address in brackets, as in [::1]:26379.
        host, bracket, port_text = address[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"invalid address '{address}': write an IPv6 address as [::1]:port")
        port_text = port_text[1:]
    else:
        host, _, port_text = address.partition(":")
    if not host:
        raise ValueError(f"invalid address '{address}': the host name is missing")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port '{port_text}' in address '{address}': expected a number from 1 to 65535")
    return host, int(port_text)


def _parse_sentinel_path(path: str) -> tuple[str, int]:
    """Return (master name, database) of `<master name>[/<db>]`."""
    name, _, db_text = path.partition("/")
    name = unquote(name)
    if not name:
        raise ValueError(
            "the master name is missing: write the name that the sentinels monitor after the addresses, "
            f"as in {SENTINEL_EXAMPLE}"
        )
    if db_text in ("", "/"):
        return name, 0
    if not db_text.isdigit():
        raise ValueError(f"invalid database '{db_text}' after the master name: expected a number such as 0")
    return name, int(db_text)


def text(value: bytes | str | None) -> str:
    """Return a Redis reply value as text: bytes decoded as UTF-8 (invalid bytes replaced), None as ''."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def connect(
    url: str, socket_timeout: float = SOCKET_TIMEOUT_SECONDS, connect_timeout: float = CONNECT_TIMEOUT_SECONDS
) -> redis.Redis:
    """Return a client for `url`. Replies stay bytes; callers decode what they read.

    A Sentinel URL returns a client whose connections ask the sentinels for the
    current master, so it follows a failover once its old connections fail. A
    cluster URL returns a `RedisCluster`, which routes each command by the slot of
    its keys. Raises redis.ConnectionError when no cluster node responds.
    """
    target = parse_url(url)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    if target.kind == SENTINEL_SCHEME:
        # The URL's credentials are for the master and its replicas. The sentinels get none.
        sentinel = redis.Sentinel(list(target.nodes), sentinel_kwargs=dict(timeouts), **timeouts)
        return sentinel.master_for(
            target.master_name, db=target.db, username=target.username, password=target.password,
            health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        )  # fmt: skip
    if target.kind == CLUSTER_SCHEME:
        # RedisCluster reads the slot map when it is created, so this already connects.
        try:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username, password=target.password, **timeouts,
            )  # fmt: skip
        except RedisClusterException as exc:
            addresses = ",".join(f"{host}:{port}" for host, port in target.nodes)
            raise redis.ConnectionError(f"no node of the Redis Cluster at {addresses} responded: {exc}") from exc
    return redis.Redis.from_url(url, health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS, **timeouts)


def is_cluster(client: object) -> bool:
    """True for a Redis Cluster client, where one command may only touch keys of one slot."""
    return isinstance(client, RedisCluster)


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless it exists.

    A new group starts at id 0, so entries added before any worker ran are not skipped.
    """
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("consumer group created stream=%s group=%s", stream, group)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class DirectCommands:
    """Commands sent on one connection of their own, packed by hiredis in a single C call.

    For every command, redis-py checks and encodes each argument in Python and takes a
    connection from its pool, with a poll of the socket. The end of a task sends about
    40 arguments, so for a no-op task that work was about a fifth of a worker's CPU (245
    against 195 µs per task in one measurement). This class sends the same bytes.

    For a client of one server, also through Sentinel: a cluster client must route each
    command to the node of its keys. Arguments must be str, bytes, int or float.
    Replies stay bytes. Safe to share between threads, which take turns.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.lock = threading.Lock()
        self.connection: redis.Connection | None = None
        # The process that opened `connection`.
        self.pid = 0

    def execute(self, commands: list[tuple]) -> list:
        """Send the commands in one write and return their replies in order.

        An error reply is returned as its exception instead of raised, so one failed
        command does not hide the replies of the others. A connection error is raised
        after the connection is closed; the next call opens a new one.
        """
        packed = b"".join([hiredis.pack_command(command) for command in commands])
        with self.lock:
            connection = self.connection
            if connection is None or self.pid != current_pid():
                # A forked child must not share its parent's socket.
                connection = self.connection = self.pool.make_connection()
                self.pid = current_pid()
            try:
                if getattr(connection, "_sock", None) is None:
                    # Connect through connect(), which a Sentinel connection overrides to
                    # ask the sentinels for the master; send_packed_command would connect
                    # to the connection's default address instead.
                    connection.connect()
                connection.send_packed_command([packed])
                replies = []
                for _command in commands:
                    try:
                        replies.append(connection.read_response())
                    except redis.ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                connection.disconnect()
                raise
        return replies
