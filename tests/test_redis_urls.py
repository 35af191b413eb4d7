"""The forms of redis.url: parsing, the errors for bad values, and the client each form gets."""

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from shared.errors import ConfigError
from shared.redis_client import SOCKET_TIMEOUT_SECONDS, RedisTarget, connect, parse_url
from shared.settings import apply_overrides, parse_config
from tests.fixtures_redis import free_port


def config_error(url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"redis": {"url": url}}, "taskvisor.yaml", "/etc/taskvisor")
    return str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
         RedisTarget("redis+sentinel", "", (("127.0.0.1", 26379), ("127.0.0.1", 26380)), "mymaster", 0)),
        ("redis+sentinel://:p%40ss@sentinel-a,sentinel-b:5000/mymaster/3",
         RedisTarget("redis+sentinel", "", (("sentinel-a", 26379), ("sentinel-b", 5000)), "mymaster", 3, None, "p@ss")),
        ("REDIS+SENTINEL://panel:pw@[::1]:26379/m/",
         RedisTarget("redis+sentinel", "", (("::1", 26379),), "m", 0, "panel", "pw")),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
         RedisTarget("redis+cluster", "", (("127.0.0.1", 7000), ("127.0.0.1", 7001)))),
        ("redis+cluster://:pw@node-a/0", RedisTarget("redis+cluster", "", (("node-a", 6379),), password="pw")),
    ],
)  # fmt: skip
def test_url_forms_parsed(url, expected):
    target = parse_url(url)
    assert target == RedisTarget(**{**expected.__dict__, "url": url})
    assert parse_config({"redis": {"url": url}}, "taskvisor.yaml", "/etc/taskvisor").redis.url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://127.0.0.1:26379", "the master name is missing"),
        ("redis+sentinel://127.0.0.1:26379/", "the master name is missing"),
        ("redis+sentinel:///mymaster", "no address given"),
        ("redis+sentinel://a:1,,b:2/mymaster", "empty address in 'a:1,,b:2'"),
        ("redis+sentinel://a:26a79/mymaster", "invalid port '26a79' in address 'a:26a79'"),
        ("redis+sentinel://a:1/mymaster/x", "invalid database 'x' after the master name"),
        ("redis+cluster://a:0", "invalid port '0' in address 'a:0'"),
        ("redis+cluster://a:70000", "invalid port '70000'"),
        ("redis+cluster://:7000", "the host name is missing"),
        ("redis+cluster://[::1:7000", "write an IPv6 address as [::1]:port"),
        ("redis+cluster://a:7000/2", "a Redis Cluster has only database 0, but the URL names '/2'"),
        ("redis+cluster://a:7000?ssl=true", "redis+cluster:// takes no query arguments"),
    ],
)  # fmt: skip
def test_bad_url_rejected(url, reason):
    message = config_error(url)
    assert message.startswith(f"taskvisor.yaml: invalid value at redis.url (value '{url}'): ")
    assert reason in message


def test_rejected_url_hides_password():
    message = config_error("redis+sentinel://panel:hunter2@a:26379?ssl=true")
    assert "(value 'redis+sentinel://panel:***@a:26379?ssl=true')" in message
    assert "hunter2" not in message


def test_url_override_accepts_new_forms():
    config = parse_config({}, "taskvisor.yaml", "/etc/taskvisor")
    url = "redis+sentinel://127.0.0.1:26379/mymaster/1"
    assert apply_overrides(config, redis_url=url).redis.url == url
    with pytest.raises(ConfigError) as caught:
        apply_overrides(config, redis_url="redis+cluster://")
    expected_start = "invalid value of --redis-url or TASKVISOR_REDIS_URL (value 'redis+cluster://'): "
    assert str(caught.value).startswith(expected_start)


def test_connect_single_server_keeps_timeouts():
    client = connect("redis://127.0.0.1:6390/2")
    assert type(client) is redis.Redis
    arguments = client.connection_pool.connection_kwargs
    assert arguments["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    assert arguments["socket_connect_timeout"] == 5
    assert arguments["db"] == 2


def test_connect_sentinel_url_asks_sentinels():
    client = connect("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/2")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    assert all(s.connection_pool.connection_kwargs["password"] is None for s in sentinels)


def test_connect_cluster_unreachable_raises_connection_error():
    port = free_port()
    with pytest.raises(redis.ConnectionError) as caught:
        connect(f"redis+cluster://127.0.0.1:{port}", connect_timeout=1)
    assert f"no node of the Redis Cluster at 127.0.0.1:{port} responded" in str(caught.value)
