"""The optional protocol version field `v` of task entries."""

import pytest

from shared.errors import InvalidEntry
from shared.schema import parse_entry
from tests.harness import command_provider, task_hash, wait_for, write_script

VALID = {"type": "start", "instance": "vm-1", "user": "u"}


@pytest.mark.parametrize("version", [None, "", "1", "1.0", "1.12"])
def test_version_one_accepted(version):
    fields = dict(VALID) if version is None else {**VALID, "v": version}

    spec = parse_entry("p", "1-0", fields)

    assert spec.id == "p:1-0"
    assert spec.instance == "vm-1"


def test_version_as_bytes_accepted():
    spec = parse_entry("p", "1-0", {b"v": b"1.3", b"type": b"stop", b"instance": b"vm-1", b"user": b"u"})

    assert spec.type == "stop"


@pytest.mark.parametrize("version", ["2", "2.0", "0", "10.1"])
def test_unknown_major_version_rejected(version):
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("p", "1-0", {**VALID, "v": version})

    reason = str(caught.value)
    assert reason.startswith(f"field 'v' has unsupported protocol version '{version}'")
    assert "this supervisor reads version 1" in reason


@pytest.mark.parametrize("version", ["v1", "1.x", "1.2.3", " 1", "1.", "-1", "12345"])
def test_malformed_version_rejected(version):
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("p", "1-0", {**VALID, "v": version})

    reason = str(caught.value)
    assert reason.startswith(f"field 'v' has invalid value {version!r}")
    assert "this supervisor reads version 1" in reason


def test_version_checked_before_other_fields():
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("p", "1-0", {"v": "2", "type": "reboot", "user": ""})

    assert str(caught.value).startswith("field 'v'")


def test_version_not_utf8_rejected():
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("p", "1-0", {**VALID, "v": b"\xff"})

    assert str(caught.value) == "field 'v' is not valid UTF-8"


def test_unknown_version_dead_lettered(tmp_path, redis_server, start_supervisor):
    script = write_script(tmp_path / "operation.sh", "cat >/dev/null\necho '{}'\n")
    start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    stream = "taskvisor:{p}:tasks"

    client.xadd(stream, {"v": "2", "id": "from-v2", "type": "start", "instance": "vm-1", "user": "u"})
    client.xadd(stream, {"v": "1.4", "id": "from-v1-4", "type": "start", "instance": "vm-1", "user": "u"})
    client.xadd(stream, {"id": "without-v", "type": "stop", "instance": "vm-1", "user": "u"})

    wait_for(lambda: client.xlen("taskvisor:{p}:dead") == 1, 15, "the version 2 entry in the dead-letter stream")
    (_dead_id, dead), = client.xrange("taskvisor:{p}:dead")
    reason = dead[b"reason"].decode()
    assert "unsupported protocol version '2'" in reason
    assert "this supervisor reads version 1" in reason
    assert b'"id":"from-v2"' in dead[b"fields"]

    # The entries after it on the same instance are not held up by it.
    wait_for(lambda: task_hash(client, "p", "without-v").get("status") == "completed", 15, "the later tasks to complete")
    assert task_hash(client, "p", "from-v1-4")["status"] == "completed"
    assert task_hash(client, "p", "from-v2").get("status") not in ("pending", "running")
    assert client.xlen(stream) == 0
