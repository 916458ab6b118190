"""Issue 10, tried as a new user would, against the real PostgreSQL and Redis.

A missing database and a Redis that refuses are one line and exit 1; a file with a reading
dated 1970, rows without their trailing empty fields and a huge bad cell replays into the
tiers without a 1970 partition or archive folder, with capped quarantine text.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from dataflows.cli import main
from tests.integration.conftest import (
    PG_ADMIN_URL,
    REDIS_URL,
    fresh_database,
    hot_prefixes,
    url_with,
)

pytestmark = pytest.mark.integration

HEADER = "node_id,timestamp,flow_rate,pressure,temperature\n"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_missing_database_is_one_line_and_exit_1(tmp_path, capsys):
    missing = url_with(PG_ADMIN_URL, dbname=f"waterflow_missing_{uuid.uuid4().hex[:8]}")
    sample = Path(__file__).parents[1] / "data" / "canonical_example.csv"
    code = main(["replay", str(sample), "--warm", missing, "--out", str(tmp_path / "out")])
    assert code == 1
    err = _one_line_error(capsys)
    assert err.startswith("error: --warm postgresql://") and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_a_redis_that_refuses_is_one_line_and_exit_1(tmp_path, capsys):
    with fresh_database("waterflow_cfg") as warm:
        hot = REDIS_URL.rsplit("/", 1)[0] + "/9999"  # Redis answers: DB index is out of range
        sample = Path(__file__).parents[1] / "data" / "canonical_example.csv"
        code = main(["replay", str(sample), "--warm", warm, "--hot", hot,
                     "--out", str(tmp_path / "out")])
        assert code == 1
        err = _one_line_error(capsys)
        assert err.startswith(f"error: --hot {hot}: refused:") and "out of range" in err


def test_old_short_and_huge_rows_replay_into_the_tiers(tmp_path, capsys, monkeypatch):
    path = tmp_path / "logger.csv"
    path.write_text(
        HEADER
        + "n1,1970-01-01T00:05:00Z,1.0,3.0,12.0\n"  # a logger's clock reset: too old
        + "n1,2024-11-13T06:00:00+01:00,1.5\n"  # pressure and temperature left off
        + "n1,2024-11-13T06:05:00+01:00,1.6,3.1\n"  # temperature left off
        + "n1,2024-11-13T06:10:00+01:00," + "7" * 20_000 + ",3.2,12.1\n"  # a 20 KB cell
        + "n1,2024-12-31T23:55:00+01:00,1.7,3.3,12.2\n"
    )
    # the variable would reject every reading of 2024; --min-timestamp below wins over it
    monkeypatch.setenv("WATERFLOW_MIN_TIMESTAMP", "2025-01-01")
    monkeypatch.setenv("WATERFLOW_QUARANTINE_RAW_BYTES", "1024")
    cold = tmp_path / "cold"
    with hot_prefixes(REDIS_URL, 1) as (prefix,), fresh_database("waterflow_cfg") as warm:
        args = ["replay", str(path), "--quiet", "--now", "2026-01-01T00:00:00+00:00",
                "--warm", warm, "--hot", REDIS_URL, "--hot-prefix", prefix,
                "--cold", cold.as_uri(), "--out", str(tmp_path / "out"),
                "--min-timestamp", "2000-01-01"]  # the option wins over the variable
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "too_old_timestamp" in out and "reconciled" in out
        with psycopg.connect(warm) as conn:
            readings = conn.execute(
                "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), flow_rate, "
                "pressure, temperature FROM water.readings ORDER BY ts").fetchall()
            quarantine = conn.execute(
                "SELECT reason, length(raw), raw FROM water.quarantine ORDER BY reason").fetchall()
            partitions = [name for (name,) in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n "
                "ON n.oid = p.relnamespace WHERE n.nspname = 'water'")]
    assert readings == [
        ("2024-11-13 05:00", 1.5, None, None),
        ("2024-11-13 05:05", 1.6, 3.1, None),
        ("2024-11-13 05:10", None, 3.2, 12.1),
        ("2024-12-31 22:55", 1.7, 3.3, 12.2),
    ]
    (value_reason, value_len, value_raw), (old_reason, _, old_raw) = quarantine
    assert old_reason == "too_old_timestamp" and old_raw.startswith("n1,1970-01-01T00:05:00")
    assert value_reason == "non_finite"  # 20 000 sevens read as a float are infinite
    assert value_len < 1100 and value_raw.endswith(f"... [cut: {10 + 20_000 - 1024} bytes]")
    assert not [p for p in partitions if "_p1970" in p], partitions
    assert sorted(d.name for d in (cold / "readings").iterdir()) == [
        "date=2024-11-13", "date=2024-12-31"]
