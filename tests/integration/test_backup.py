"""deploy/local/backup.sh: the documented pg_dump of the warm tier, restored with pg_restore."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from connectors.warm_postgres import migrate
from grafana.queries import replay
from tests.integration.conftest import (
    PG_ADMIN_URL,
    REDIS_URL,
    fresh_database,
    hot_prefixes,
    url_with,
)
from tests.integration.warm_snapshot import counts, partitions

pytestmark = pytest.mark.integration

BACKUP = Path(__file__).parents[2] / "deploy" / "local" / "backup.sh"
DUMP_NAME = re.compile(r"water-\d{8}T\d{6}Z\.dump")


def run_backup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    return subprocess.run(["bash", str(BACKUP), *args], capture_output=True, text=True,
                          timeout=300, check=False, env={**base, **(env or {})})


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """A database filled by a replay of the samples."""
    with hot_prefixes(REDIS_URL, 1) as (prefix,), fresh_database("waterflow_backup") as url:
        replay(url, REDIS_URL, prefix, tmp_path_factory.mktemp("backup"))
        yield url


def test_a_dump_restores_into_a_fresh_database_with_the_same_rows(replayed, tmp_path):
    folder = tmp_path / "backups"
    done = run_backup(env={"WATERFLOW_WARM_URL": replayed, "WATERFLOW_BACKUP_DIR": str(folder),
                           "WATERFLOW_BACKUP_ROLES": "1"})
    assert done.returncode == 0, done.stderr
    dump = Path(done.stdout.strip())
    assert dump.parent == folder and DUMP_NAME.fullmatch(dump.name), done.stdout
    # Nothing else but the dump and the roles beside it (no partial file left).
    roles = folder / dump.name.replace(".dump", "-roles.sql")
    assert sorted(folder.iterdir()) == sorted([dump, roles])
    assert "CREATE ROLE water_reader;" in roles.read_text()
    assert "PASSWORD" not in roles.read_text()

    with fresh_database("waterflow_restore") as target:
        done = subprocess.run(
            ["pg_restore", "--exit-on-error", "--no-password", "--dbname", target, str(dump)],
            capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        original, restored = counts(replayed), counts(target)
        assert restored == original
        assert original["readings"] > 20_000 and original["forecasts"] > 10_000
        assert all(original[t] > 0 for t in ("kpi_15m", "kpi_daily", "anomalies",
                                             "district_balance", "quarantine", "ingest_runs"))
        with psycopg.connect(replayed) as a, psycopg.connect(target) as b:
            assert partitions(b) == partitions(a)
            # The bookkeeping came along: nothing to migrate on the restored database.
            query = "SELECT version, applied_at FROM water.schema_migrations ORDER BY 1"
            assert b.execute(query).fetchall() == a.execute(query).fetchall()
        assert migrate(target) == []
        # The grants came along too: Grafana's role reads the restored tables.
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("SET ROLE water_reader")
            (n,) = conn.execute("SELECT count(*) FROM water.readings").fetchone() or (0,)
            assert n == original["readings"]


def test_old_dumps_go_after_the_days_to_keep(replayed, tmp_path):
    folder = tmp_path / "backups"
    folder.mkdir()
    old, recent, other = (folder / "water-20240101T000000Z.dump",
                          folder / "water-20240102T000000Z.dump", folder / "notes.txt")
    for f in (old, recent, other):
        f.write_text("x")
    now = time.time()
    os.utime(old, (now - 8 * 86400, now - 8 * 86400))
    os.utime(other, (now - 30 * 86400, now - 30 * 86400))
    os.utime(recent, (now - 2 * 86400, now - 2 * 86400))
    done = run_backup(replayed, str(folder), env={"WATERFLOW_BACKUP_KEEP_DAYS": "7"})
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.strip())
    assert sorted(folder.iterdir()) == sorted([recent, other, written])


def test_refusals_leave_nothing_behind(tmp_path):
    folder = tmp_path / "backups"
    done = run_backup(env={"WATERFLOW_BACKUP_DIR": str(folder)})
    assert done.returncode == 2
    assert "WATERFLOW_WARM_URL" in done.stderr
    done = run_backup("postgresql://127.0.0.1/x", str(folder),
                      env={"WATERFLOW_BACKUP_KEEP_DAYS": "a week"})
    assert done.returncode == 2 and "'a week'" in done.stderr
    missing = url_with(PG_ADMIN_URL, dbname=f"waterflow_missing_{uuid.uuid4().hex[:12]}")
    done = run_backup(missing, str(folder))
    assert done.returncode == 1
    assert "pg_dump of schema water failed" in done.stderr
    assert list(folder.iterdir()) == []
