"""The least-privilege Redis users of deploy/local/redis-acl.sh, on a redis-server of our own.

A replay writes the hot tier as the ``waterflow`` user with nothing denied (Redis' ACL log stays
empty: the user lacks no command the hot writer sends, its Lua scripts' commands included), and
that user is refused what a cache writer never needs: FLUSHALL, CONFIG, KEYS, keys outside the
prefix, even through a script. The reader user reads the hot state and writes nothing.
"""

from __future__ import annotations

import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from dataflows.cli import main
from tests.integration.conftest import fresh_database
from tests.integration.test_hot_connect import RedisServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "deploy" / "local" / "redis-acl.sh"
SAMPLE = REPO / "tests" / "data" / "canonical_example.csv"
ADMIN_PW = f"admin-{uuid.uuid4().hex}"
WRITER_PW = f"writer-{uuid.uuid4().hex}"
READER_PW = f"reader-{uuid.uuid4().hex}"


def acl_lines(*args: str, reader: bool = False, prefix: str = "water:") -> list[str]:
    """What redis-acl.sh prints for our passwords."""
    env = {"PATH": "/usr/bin:/bin", "WATERFLOW_REDIS_PASSWORD": WRITER_PW,
           "WATERFLOW_HOT_PREFIX": prefix}
    if reader:
        env["WATERFLOW_REDIS_READER_PASSWORD"] = READER_PW
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=30, check=True)
    return done.stdout.splitlines()


@pytest.fixture
def server(tmp_path) -> Iterator[RedisServer]:
    """Users from the script's ACL file, an admin for the assertions, the default user off."""
    aclfile = tmp_path / "users.acl"
    lines = acl_lines("--aclfile")
    aclfile.write_text("\n".join([*lines, f"user admin on >{ADMIN_PW} ~* &* +@all",
                                  "user default off", ""]))
    s = RedisServer(tmp_path, "--aclfile", str(aclfile)).start()
    yield s
    s.kill()


def client(server: RedisServer, user: str, password: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username=user, password=password,
                       decode_responses=True, socket_timeout=5)


def test_the_script_keeps_passwords_out_and_rejects_a_glob_prefix():
    text = "\n".join(acl_lines(reader=True) + acl_lines("--aclfile", reader=True))
    assert WRITER_PW not in text and READER_PW not in text
    assert len(acl_lines(reader=True)) == 2 and len(acl_lines()) == 1
    bad = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "WATERFLOW_REDIS_PASSWORD": "x",
                              "WATERFLOW_HOT_PREFIX": "water*"})
    assert bad.returncode == 2 and "glob characters" in bad.stderr


def test_a_replay_as_the_waterflow_user_needs_nothing_more(server, tmp_path, capsys):
    url = f"redis://waterflow:{WRITER_PW}@127.0.0.1:{server.port}/0"
    admin = client(server, "admin", ADMIN_PW)
    with fresh_database("waterflow_acl") as warm:
        code = main(["replay", str(SAMPLE), "--quiet", "--warm", warm, "--hot", url,
                     "--cold", (tmp_path / "cold").as_uri(), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert WRITER_PW not in capsys.readouterr().err
    nodes = {line.split(",")[0] for line in SAMPLE.read_text().splitlines()[1:]}
    assert set(admin.zrange("water:nodes:last_seen", 0, -1)) == nodes
    for node in nodes:
        assert admin.hget(f"water:node:{node}:latest", "ts_epoch")
        assert admin.zcard(f"water:node:{node}:readings") > 0
    assert all(k.startswith("water:") for k in admin.keys("*"))
    assert admin.acl_log() == []  # not one command of the replay was denied
    admin.close()


def test_the_waterflow_user_is_refused_what_a_cache_writer_never_needs(server):
    w = client(server, "waterflow", WRITER_PW)
    w.set("water:ok", "1", ex=60)  # its own prefix: allowed
    refused = {
        "FLUSHALL": lambda: w.flushall(),
        "FLUSHDB": lambda: w.flushdb(),
        "CONFIG": lambda: w.config_get("requirepass"),
        "KEYS": lambda: w.keys("water:*"),
        "SCAN": lambda: w.scan(0),
        "write outside the prefix": lambda: w.set("other:key", "1"),
        "read outside the prefix": lambda: w.hget("other:hash", "f"),
        "EVAL": lambda: w.eval("return 1", 0),
        "ACL": lambda: w.acl_list(),
        "SHUTDOWN": lambda: w.execute_command("SHUTDOWN"),
    }
    allowed = []
    for what, call in refused.items():
        try:
            call()
            allowed.append(what)
        except redis.exceptions.NoPermissionError:
            pass
    assert allowed == []
    # A script it may load cannot write outside the prefix either: Redis checks its commands.
    sha = w.script_load("return redis.call('SET', KEYS[1], 'x')")
    assert w.evalsha(sha, 1, "water:by-script") == "OK"
    with pytest.raises(redis.exceptions.ResponseError, match="(?i)no permissions|NOPERM"):
        w.evalsha(sha, 1, "other:by-script")
    admin = client(server, "admin", ADMIN_PW)
    assert admin.exists("other:key", "other:by-script") == 0
    assert admin.exists("water:ok", "water:by-script") == 2
    admin.close()
    w.close()


def test_setuser_lines_apply_and_the_reader_only_reads(server):
    admin = client(server, "admin", ADMIN_PW)
    for line in acl_lines(reader=True, prefix="city:"):
        assert admin.execute_command(*shlex.split(line)) == "OK"
    w = client(server, "waterflow", WRITER_PW)
    w.hset("city:node:n1:latest", "flow_rate", "1.5")
    with pytest.raises(redis.exceptions.NoPermissionError):
        w.hset("water:node:n1:latest", "flow_rate", "1.5")  # the old prefix is gone (reset)
    r = client(server, "waterflow_reader", READER_PW)
    assert r.hgetall("city:node:n1:latest") == {"flow_rate": "1.5"}
    for call in (lambda: r.hset("city:node:n1:latest", "flow_rate", "9"),
                 lambda: r.delete("city:node:n1:latest"),
                 lambda: r.hgetall("other:x"),
                 lambda: r.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    assert admin.hget("city:node:n1:latest", "flow_rate") == "1.5"
    for c in (admin, w, r):
        c.close()


def test_the_compose_redis_service_builds_users_a_real_server_accepts(tmp_path):
    """docker-compose.yml's redis command, run here up to the server start (no Docker here)."""
    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"][
        "command"]
    assert command[:2] == ["bash", "-c"]
    script = command[2].replace("$$", "$")  # compose's escape of a literal $
    build_file, start = script.split("chown redis", 1)
    assert "--aclfile /tmp/users.acl" in start
    aclfile = tmp_path / "users.acl"
    build_file = build_file.replace("/etc/waterflow/redis-acl.sh", str(SCRIPT))
    build_file = build_file.replace("/tmp/users.acl", str(aclfile)).rstrip().removesuffix("&&")
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": ADMIN_PW,
           "WATERFLOW_REDIS_PASSWORD": WRITER_PW}
    subprocess.run(["bash", "-c", build_file], env=env, check=True, timeout=30)
    assert ADMIN_PW not in aclfile.read_text() and WRITER_PW not in aclfile.read_text()
    s = RedisServer(tmp_path, "--aclfile", str(aclfile)).start()
    try:
        admin = client(s, "default", ADMIN_PW)  # the health check's and the operator's user
        assert admin.ping() is True
        w = client(s, "waterflow", WRITER_PW)  # the pipeline's WATERFLOW_HOT_URL user
        assert w.set("water:ok", "1", ex=60) is True
        with pytest.raises(redis.exceptions.NoPermissionError):
            w.set("other:key", "1")
        with pytest.raises(redis.exceptions.AuthenticationError):
            client(s, "default", WRITER_PW).ping()
        admin.close()
        w.close()
    finally:
        s.kill()
