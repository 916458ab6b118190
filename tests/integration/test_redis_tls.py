"""Replays into a TLS-only redis-server of our own: ``rediss://`` with the CA in the URL works,
and a wrong scheme or a missing CA is one line and exit 1 before anything is written.

The throwaway CA and server certificate come from test_hot_connect's ``pki`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dataflows.cli import main
from tests.integration import test_hot_connect
from tests.integration.conftest import REDIS_URL, fresh_database
from tests.integration.test_hot_connect import RedisServer

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).parents[1] / "data" / "canonical_example.csv"
pki = test_hot_connect.pki


@pytest.fixture(scope="module")
def warm() -> Iterator[str]:
    with fresh_database("waterflow_tls") as url:
        yield url


@pytest.fixture
def tls_server(tmp_path, pki) -> Iterator[RedisServer]:
    """redis-server with its TLS port only (``--port 0``): no plain connection possible."""
    server = RedisServer(
        tmp_path, "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file",
        str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.pem"),
        "--tls-auth-clients", "no", tls=True,
    ).start()  # fmt: skip
    yield server
    server.kill()


def _replay(hot: str, warm: str, tmp_path: Path) -> int:
    return main(["replay", str(SAMPLE), "--quiet", "--warm", warm, "--hot", hot,
                 "--cold", (tmp_path / "cold").as_uri(), "--out", str(tmp_path / "out")])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def test_rediss_with_the_ca_in_the_url_writes_the_hot_tier(tls_server, pki, warm, tmp_path):
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={pki / 'ca.pem'}"
    assert _replay(url, warm, tmp_path) == 0
    check = redis.from_url(url, decode_responses=True)
    nodes = {line.split(",")[0] for line in SAMPLE.read_text().splitlines()[1:]}
    assert set(check.zrange("water:nodes:last_seen", 0, -1)) == nodes
    assert all(check.hget(f"water:node:{n}:latest", "ts_epoch") for n in nodes)
    check.close()


def test_plain_redis_to_the_tls_port_is_one_line(tls_server, warm, tmp_path, capsys):
    url = f"redis://127.0.0.1:{tls_server.port}/0"
    assert _replay(url, warm, tmp_path) == 1
    err = _one_line_error(capsys)
    assert err.startswith(
        f"error: --hot {url}: refused: 127.0.0.1:{tls_server.port} speaks TLS only: use rediss://"
    ), err
    assert not (tmp_path / "cold").exists()


def test_rediss_without_the_ca_is_one_line(tls_server, warm, tmp_path, capsys):
    url = f"rediss://127.0.0.1:{tls_server.port}/0"
    assert _replay(url, warm, tmp_path) == 1
    err = _one_line_error(capsys)
    assert err.startswith(f"error: --hot {url}: refused:") and "CERTIFICATE_VERIFY_FAILED" in err
    assert err.endswith("as ?ssl_ca_certs=/path/ca.pem)")


def test_rediss_to_a_plain_port_is_one_line(warm, tmp_path, capsys):
    plain = redis.from_url(REDIS_URL)
    port = plain.connection_pool.connection_kwargs["port"]
    plain.close()
    url = f"rediss://127.0.0.1:{port}/0"  # the shared Redis: only probed, never written
    assert _replay(url, warm, tmp_path) == 1
    err = _one_line_error(capsys)
    assert err.startswith(
        f"error: --hot {url}: refused: 127.0.0.1:{port} speaks plain Redis, not TLS: use redis://"
    ), err
