"""A reset-password task's password must end up nowhere: not in SQL, Redis or logs."""

import sqlite3

from tests.harness import SupervisorProcess, command_provider, task_hash, wait_for, write_script

PASSWORD = "Tr0ub4dor-3-horse"


def dump_redis(client) -> str:
    """Return every key and value in the Redis database as one text."""
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        parts.append(key.decode(errors="replace"))
        if kind == "string":
            parts.append(repr(client.get(key)))
        elif kind == "hash":
            parts.append(repr(client.hgetall(key)))
        elif kind == "stream":
            parts.append(repr(client.xrange(key)))
        elif kind == "list":
            parts.append(repr(client.lrange(key, 0, -1)))
        elif kind == "set":
            parts.append(repr(client.smembers(key)))
        elif kind == "zset":
            parts.append(repr(client.zrange(key, 0, -1, withscores=True)))
    return "\n".join(parts)


def dump_sqlite(path: str) -> str:
    connection = sqlite3.connect(path)
    try:
        rows = []
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            rows += [repr(row) for row in connection.execute(f"SELECT * FROM {table}")]
        return "\n".join(rows)
    finally:
        connection.close()


def test_password_appears_nowhere(tmp_path, redis_server):
    # The script misbehaves on purpose: it echoes the password in progress, stderr and result.
    script = write_script(
        tmp_path / "chpasswd.sh",
        "input=$(cat)\n"
        "password=$(printf '%s' \"$input\" | sed -n 's/.*\"password\": *\"\\([^\"]*\\)\".*/\\1/p')\n"
        'echo "progress 50 setting password $password"\n'
        'echo "new password is $password" >&2\n'
        'if [ "$1" = "reset-password" ]; then echo "{\\"password\\": \\"$password\\", \\"note\\": \\"set $password\\"}"; exit 0; fi\n'
        "exit 1\n",
    )
    db_path = tmp_path / "tasks.db"
    supervisor = SupervisorProcess(tmp_path, redis_server.url, f"sqlite:///{db_path}", {"p": command_provider(script)})
    supervisor.start()
    try:
        client = redis_server.client()
        data = f'{{"username": "root", "password": "{PASSWORD}", "api_token": "{PASSWORD}-t"}}'
        client.xadd("taskvisor:{p}:tasks", {"id": "rp", "type": "reset-password", "instance": "vm-1", "user": "u", "data": data})
        client.xadd("taskvisor:{p}:tasks", {"id": "fails", "type": "start", "instance": "vm-1", "user": "u", "data": data})
        client.xadd("taskvisor:{p}:tasks", {"type": "bogus", "instance": "vm-1", "user": "u", "data": data})

        wait_for(lambda: task_hash(client, "p", "rp").get("status") == "completed", 15, "the reset-password task")
        wait_for(lambda: task_hash(client, "p", "fails").get("status") == "failed", 15, "the failing task")
        wait_for(lambda: client.xlen("taskvisor:{p}:dead") == 1, 10, "the dead letter")
        wait_for(lambda: "fails" in dump_sqlite(str(db_path)) and "failed" in dump_sqlite(str(db_path)), 10, "the SQL rows")
        assert supervisor.stop() == 0

        redis_text = dump_redis(client)
        sql_text = dump_sqlite(str(db_path))
        log_text = supervisor.log()
        assert PASSWORD not in redis_text
        assert PASSWORD not in sql_text
        assert PASSWORD not in log_text
        assert task_hash(client, "p", "rp")["data"] == '{"username":"root","password":"***","api_token":"***"}'
        assert task_hash(client, "p", "rp")["result"] == '{"password":"***","note":"set ***"}'
        assert task_hash(client, "p", "fails")["error"] == "command exited with status 1: new password is ***"
    finally:
        supervisor.kill_all()
