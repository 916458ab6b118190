"""Hot tier URLs with an ACL user and password, and with TLS, against redis-servers of our own.

Each test starts its own ``redis-server`` on a free 127.0.0.1 port (never the shared 6379) and
stops it by pid. ``RedisServer`` is also used by ``test_hot_outage.py``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from connectors.hot_redis import HotRedisWriter
from dataflows.model import US_PER_S
from dataflows.tables import frame

pytestmark = pytest.mark.integration

T0 = 1_700_000_000 * US_PER_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (no persistence), started and stopped by pid."""

    def __init__(self, workdir: Path, *args: str, tls: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (deploy/local/install-debs.sh installs it)")
        self.workdir = workdir
        self.args = args
        self.tls = tls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"redis-{self.port}.log"

    def start(self) -> RedisServer:
        ports = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        cmd = [
            "redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--logfile", str(self.log), *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                pytest.fail(f"redis-server {' '.join(cmd)} exited at start:\n{err}\n{log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server on port {self.port} did not accept connections in 10 s")

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is kept (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    stop = kill


@pytest.fixture
def servers(tmp_path):
    """Start servers with ``servers(*args, tls=...)``; every one is killed at teardown."""
    started: list[RedisServer] = []

    def start(*args: str, tls: bool = False) -> RedisServer:
        server = RedisServer(tmp_path, *args, tls=tls).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def _one_reading(node: str):
    return frame("readings", {"node_id": [node], "ts": [T0], "flow_rate": [1.5]})


def test_acl_user_and_password(servers):
    secret = f"pw-{uuid.uuid4().hex}"
    # The default user is disabled: only the application's user, limited to water:* keys.
    server = servers(
        "--user", "default", "off",
        "--user", "app", "on", f">{secret}", "~water:*", "+@all", "-@dangerous",
        "--user", "admin", "on", f">{secret}", "~*", "+@all",
    )  # fmt: skip
    base = f"127.0.0.1:{server.port}/0"

    wrong = HotRedisWriter(f"redis://app:not-{secret}@{base}")
    with pytest.raises(RuntimeError, match="refused the credentials") as info:
        wrong.connect()
    assert f"redis://app:***@{base}" in str(info.value)
    assert secret not in str(info.value)
    wrong.close()

    anonymous = HotRedisWriter(f"redis://{base}")
    with pytest.raises(RuntimeError, match=f"redis://{base}"):
        anonymous.connect()  # default user off: NOAUTH, a setup error, not an outage
    anonymous.close()

    good = HotRedisWriter(f"redis://app:{secret}@{base}")
    good.connect()
    good.write(_one_reading("acl"))
    assert not good.behind
    good.close()
    check = redis.from_url(f"redis://admin:{secret}@{base}", decode_responses=True)
    assert check.hget("water:node:acl:latest", "flow_rate") == "1.5"
    assert 0 < check.ttl("water:node:acl:readings") <= 48 * 3600
    check.close()


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (deploy/local/install-debs.sh installs it)")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "1", "-subj", "/CN=waterflow test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


def _tls_args(d: Path, clients: str) -> tuple[str, ...]:
    return (
        "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
        "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", clients,
    )  # fmt: skip


def test_tls_with_server_verification(servers, pki):
    # Debian's redis-server 7 is built with TLS; if a build is not, start() fails saying so.
    server = servers(*_tls_args(pki, "no"), tls=True)
    base = f"rediss://127.0.0.1:{server.port}/0"

    unverified = HotRedisWriter(f"{base}?ssl_cert_reqs=required")  # system CAs: unknown CA
    with pytest.raises(RuntimeError, match="TLS handshake with rediss://127.0.0.1"):
        unverified.connect()
    unverified.close()

    url = f"{base}?ssl_cert_reqs=required&ssl_ca_certs={pki / 'ca.pem'}"
    w = HotRedisWriter(url)
    w.connect()
    w.write(_one_reading("tls"))
    assert not w.behind
    w.close()
    check = redis.from_url(url, decode_responses=True)
    assert check.hget("water:node:tls:latest", "flow_rate") == "1.5"
    check.close()


def test_tls_with_client_certificate(servers, pki):
    server = servers(*_tls_args(pki, "yes"), tls=True)
    url = (
        f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={pki / 'ca.pem'}"
        f"&ssl_certfile={pki / 'client.pem'}&ssl_keyfile={pki / 'client.key'}"
    )
    w = HotRedisWriter(url)
    w.connect()
    w.write(_one_reading("mtls"))
    assert not w.behind
    w.close()
