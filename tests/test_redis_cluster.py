"""A supervisor on a three-master Redis Cluster: placement, tasks, SQL, cancel, resize and the Lua scripts."""

import json
import os
import urllib.error
import urllib.request

import orjson
from redis.cluster import RedisCluster

from shared.client import TaskvisorClient
from shared.keys import Keys
from shared.redis_client import SOCKET_TIMEOUT_SECONDS, connect
from shared.store import open_store
from tests.harness import cli, command_provider, task_hash, wait_for, write_script

KEYS = Keys()
# The no-proxy opener keeps every request on the loopback URL the supervisor logged.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str) -> tuple[int, str]:
    try:
        with OPENER.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def providers_on_each_master(client: RedisCluster, stem: str) -> list[str]:
    """Return one provider id per master, chosen by the slot of the provider's hash tag."""
    chosen: dict[str, str] = {}
    for index in range(500):
        provider = f"{stem}-{index}"
        chosen.setdefault(client.get_node_from_key(KEYS.tasks(provider)).name, provider)
    assert len(chosen) == 3, f"providers named {stem}-N landed on {len(chosen)} masters"
    return sorted(chosen.values())


def sql_statuses(database_url: str, provider: str) -> dict[str, str]:
    store = open_store(database_url)
    try:
        return {row["id"]: row["status"] for row in store.list_tasks(provider=provider, limit=500)}
    finally:
        store.close()


def test_cluster_spreads_providers_over_masters(tmp_path, redis_cluster, start_supervisor_at, sqlite_url):
    client = redis_cluster.client()
    connected = connect(redis_cluster.url)
    assert isinstance(connected, RedisCluster)
    node_pool = connected.get_default_node().redis_connection.connection_pool
    assert node_pool.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    providers = providers_on_each_master(client, "spread")
    node_client = redis_cluster.nodes[0].client()
    for provider in providers:
        keys = [KEYS.tasks(provider), KEYS.events(provider), KEYS.task(provider, "t"), KEYS.lease(provider, "t"),
                KEYS.limit(provider), KEYS.busy(provider), KEYS.instance_queue(provider, "vm-1")]  # fmt: skip
        slots = {node_client.execute_command("CLUSTER KEYSLOT", key) for key in keys}
        assert len(slots) == 1, f"keys of {provider} hash to slots {slots}"

    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\nsleep 0.1\necho "{{}}"\n')
    supervisor = start_supervisor_at(
        redis_cluster.url, {p: command_provider(script, concurrent=2) for p in providers}, health={}
    )
    pushed = {provider: [f"{provider}-t{index}" for index in range(6)] for provider in providers}
    for provider, ids in pushed.items():
        for index, task_id in enumerate(ids):
            fields = {"id": task_id, "type": "restart", "instance": f"vm-{index % 3}", "user": "u"}
            client.xadd(KEYS.tasks(provider), fields)

    def all_completed() -> bool:
        return all(task_hash(client, p, t).get("status") == "completed" for p, ids in pushed.items() for t in ids)

    wait_for(all_completed, 30, "every task to complete on the cluster")
    holders = {provider: redis_cluster.node_holding(KEYS.events(provider)).port for provider in providers}
    assert len(set(holders.values())) == 3, f"event streams by node port: {holders}"
    for provider in providers:
        assert redis_cluster.node_holding(KEYS.tasks(provider)).port == holders[provider]
    for provider, ids in pushed.items():
        wait_for(lambda p=provider, ids=ids: sql_statuses(sqlite_url, p) == {t: "completed" for t in ids}, 15,
                 f"SQL rows of {provider}")  # fmt: skip
    assert sorted(runs.read_text().split()) == sorted(t for ids in pushed.values() for t in ids)

    # A second status record in another slot makes `provider list` read keys of two slots.
    other_status = "taskvisor:supervisor:other-host"
    assert client.keyslot(other_status) != client.keyslot("taskvisor:supervisor:test")
    client.set(other_status, orjson.dumps({"name": "other-host", "providers": {}}), px=60_000)
    listed = cli(supervisor.config_path, "provider", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["provider"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert sorted(rows) == providers
    assert all(rows[p]["workers"] == 2 for p in providers), rows
    stats = cli(supervisor.config_path, "stats")
    assert stats.returncode == 0, stats.stderr

    health_url = supervisor.health_url()
    wait_for(lambda: http_get(health_url + "/readyz")[0] == 200, 15, "/readyz to report ready on the cluster")
    code, metrics = http_get(health_url + "/metrics")
    assert code == 200
    assert 'taskvisor_source_up{source="redis"} 1' in metrics
    assert "Script attempted to access" not in supervisor.log()


def test_cluster_cancel_and_resize(tmp_path, redis_cluster, start_supervisor_at):
    client = redis_cluster.client()
    provider = providers_on_each_master(client, "resize")[0]
    pids = tmp_path / "pids"
    pids.mkdir()
    script = write_script(tmp_path / "long.sh", f'cat >/dev/null\necho $$ > {pids}/$3\nsleep 30 &\nwait\n')
    supervisor = start_supervisor_at(redis_cluster.url, {provider: command_provider(script, kill_grace=1.0)})

    first = f"{provider}-first"
    client.xadd(KEYS.tasks(provider), {"id": first, "type": "start", "instance": "vm-0", "user": "u"})
    wait_for(lambda: task_hash(client, provider, first).get("status") == "running", 15, "the first task to run")
    cancelled = cli(supervisor.config_path, "cancel", first)
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for(lambda: task_hash(client, provider, first).get("status") == "cancelled", 10, "the cancel to apply")

    resized = cli(
        supervisor.config_path, "provider", "set", provider, "allowConcurrentTasks=true", "maxConcurrentTasks=3"
    )
    assert resized.returncode == 0, resized.stderr
    wait_for(lambda: client.get(KEYS.limit(provider)) == b"3", 10, "the provider's limit to become 3")
    # The producer module's client pushes and cancels these three through the cluster.
    producer = TaskvisorClient.from_url(redis_cluster.url)
    ids = [producer.submit(provider, "start", user="u", instance=f"vm-{index + 1}") for index in range(3)]
    wait_for(lambda: all(task_hash(client, provider, t).get("status") == "running" for t in ids), 15,
             "three tasks running at once after the resize")  # fmt: skip
    for task_id in ids:
        producer.cancel(provider, task_id, wait=10)
    wait_for(lambda: all(task_hash(client, provider, t).get("status") == "cancelled" for t in ids), 10, "three cancels")


def test_cluster_scripts_reach_undeclared_keys(tmp_path, redis_cluster, start_supervisor_at):
    """start.lua reads leases of busy workers and release.lua a dead worker's lease, by names they build."""
    client = redis_cluster.client()
    provider = providers_on_each_master(client, "scripts")[0]
    markers = tmp_path / "markers"
    markers.mkdir()
    # The first run of each task waits long enough to be killed; a rerun ends at once.
    script = write_script(
        tmp_path / "op.sh",
        f'cat >/dev/null\nif [ ! -e {markers}/$3 ]; then touch {markers}/$3; sleep 30 & wait; fi\necho "{{}}"\n',
    )
    supervisor = start_supervisor_at(redis_cluster.url, {provider: command_provider(script)})
    wait_for(lambda: client.get(KEYS.limit(provider)) == b"1", 10, "the supervisor to write the provider's limit")

    # A busy entry of a worker that holds no lease fills the limit of 1, so start.lua
    # must look up that worker's lease, under a name it builds, before it starts the task.
    client.hset(KEYS.busy(provider), "ghost-worker:1", "ghost-task 0")
    quick = f"{provider}-quick"
    (markers / quick).touch()
    client.xadd(KEYS.tasks(provider), {"id": quick, "type": "start", "instance": "vm-0", "user": "u"})
    wait_for(lambda: task_hash(client, provider, quick).get("status") == "completed", 15, "the quick task")
    assert not client.hexists(KEYS.busy(provider), "ghost-worker:1")

    # The supervisor releases a killed worker's lease with release.lua, so the task is taken over at once.
    task_id = f"{provider}-killed"
    client.xadd(KEYS.tasks(provider), {"id": task_id, "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, provider, task_id).get("status") == "running", 15, "the task to run")
    owner = task_hash(client, provider, task_id)["owner"]
    assert client.get(KEYS.lease(provider, task_id)).decode() == owner
    os.kill(int(owner.rsplit(":", 1)[1]), 9)
    wait_for(lambda: f"worker died while running a task task_id={task_id}" in supervisor.log(), 10,
             "the supervisor to release the dead worker's lease")  # fmt: skip
    wait_for(lambda: task_hash(client, provider, task_id).get("status") == "completed", 15, "the task's second run")
    assert task_hash(client, provider, task_id)["attempts"] == "2"
    assert "Script attempted to access" not in supervisor.log()
