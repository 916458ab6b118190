"""Replays into a PostgreSQL cluster of our own that takes TLS connections only.

The module starts one cluster (initdb in a temporary folder, a free 127.0.0.1 port, ``ssl=on``
with a throwaway CA's server certificate, pg_hba: ``hostssl ... trust`` and ``hostnossl ...
reject``) and stops it by its postmaster pid. ``sslmode=require`` and ``verify-full`` with
``sslrootcert`` write the warm tier; ``sslmode=disable`` and ``verify-full`` without the CA are
one line and exit 1 before anything is written. initdb refuses to run as root: as root the
cluster runs as the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from dataflows.cli import main
from tests.integration.conftest import REDIS_URL, hot_prefixes
from tests.integration.test_hot_connect import free_port

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).parents[1] / "data" / "canonical_example.csv"
PG_BIN = Path(os.environ.get("WATERFLOW_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass(frozen=True)
class TlsCluster:
    port: int
    ca: Path

    def url(self, dbname: str, query: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?{query}"


def _run(cmd: list[str], cwd: Path, as_user: str | None) -> None:
    if as_user is not None:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _certificates(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (deploy/local/install-debs.sh installs it)")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "1", "-subj", "/CN=waterflow test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext"],
    ):  # fmt: skip
        _run(["openssl", *cmd], d, None)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TlsCluster]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"no initdb in {PG_BIN} (set WATERFLOW_TEST_PG_BIN to PostgreSQL's bin folder)")
    as_user = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: as root that is 0700 root, out of the postgres user's reach.
    base = Path(tempfile.mkdtemp(prefix="waterflow-pgtls-"))
    pki = base / "pki"
    pki.mkdir()
    _certificates(pki)
    if as_user is not None:
        owner = pwd.getpwnam(as_user)
        for path in (base, pki / "server.key", pki / "server.pem"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    (pki / "server.key").chmod(0o600)
    pki.chmod(0o755)
    data = base / "data"
    port = free_port()
    pid: int | None = None
    try:
        _run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "-E", "UTF8", "--no-sync"], base, as_user)  # fmt: skip
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        options = (
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c ssl=on "
            f"-c ssl_cert_file={pki / 'server.pem'} -c ssl_key_file={pki / 'server.key'} "
            "-c fsync=off"
        )
        _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-w",
              "-t", "60", "-o", options, "start"], base, as_user)  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield TlsCluster(port, pki / "ca.pem")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def database(cluster) -> Iterator[str]:
    """A new database in the TLS cluster (the admin connection itself goes through TLS)."""
    name = f"water_tls_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.url("postgres", "sslmode=require"), autocommit=True) as admin:
        assert admin.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                             ).fetchone() == (True,)
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def _replay(warm: str, tmp_path: Path) -> int:
    with hot_prefixes(REDIS_URL, 1) as (prefix,):
        return main(["replay", str(SAMPLE), "--quiet", "--warm", warm, "--hot", REDIS_URL,
                     "--hot-prefix", prefix, "--cold", (tmp_path / "cold").as_uri(),
                     "--out", str(tmp_path / "out")])


def _sample_readings() -> list[tuple[str, float]]:
    rows = [line.split(",") for line in SAMPLE.read_text().splitlines()[1:]]
    return sorted((node, float(flow)) for node, _, flow, *_ in rows)


@pytest.mark.parametrize("query", ["sslmode=require", "sslmode=verify-full&sslrootcert={ca}"])
def test_a_replay_over_tls_writes_the_warm_tier(cluster, database, query, tmp_path):
    url = cluster.url(database, query.format(ca=cluster.ca))
    assert _replay(url, tmp_path) == 0
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT node_id, flow_rate FROM water.readings").fetchall()
    assert sorted(rows) == _sample_readings()


@pytest.mark.parametrize(
    ("query", "cause"),
    [
        ("sslmode=disable", 'pg_hba.conf rejects connection for host "127.0.0.1", user '
         '"postgres", database "{db}", no encryption'),
        ("sslmode=verify-full&sslrootcert={missing}", "root certificate file"),
    ],
)
def test_a_refused_tls_setting_is_one_line(cluster, database, query, cause, tmp_path, capsys):
    url = cluster.url(database, query.format(missing=tmp_path / "no-ca.pem"))
    assert _replay(url, tmp_path) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --warm {url}: cannot connect:"), err
    assert cause.format(db=database) in err, err
    assert not (tmp_path / "cold").exists()
