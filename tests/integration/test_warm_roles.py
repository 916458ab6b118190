"""The two roles of the warm tier on partitioned tables: water_reader reads, water_writer writes.

Runs on the session database (migrated), connecting as each role (trust auth on the build
machines). The roles are cluster-wide and created by migration 0002.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid

import psycopg
import pytest

from connectors.warm_postgres import WarmPostgresWriter
from dataflows.model import US_PER_S
from dataflows.tables import frame

pytestmark = pytest.mark.integration

WRITES = [
    "INSERT INTO water.{t} (node_id, {c}) VALUES ('x', '2021-01-01')",
    "UPDATE water.{t} SET node_id = node_id",
    "DELETE FROM water.{t}",
    "TRUNCATE water.{t}",
]


@pytest.fixture
def month(pg) -> dt.datetime:
    """A month no other test writes, whose partitions do not exist yet."""
    while True:
        m = dt.datetime(random.randrange(1950, 1990), random.randrange(1, 13), 1, tzinfo=dt.UTC)
        name = f"water.readings_p{m:%Y%m}"
        if pg.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
            return m


def test_writer_creates_partitions_and_reader_sees_them(conninfo_as, pg, month):
    node = f"role-{uuid.uuid4().hex[:8]}"
    start = int(month.timestamp() * US_PER_S)
    w = WarmPostgresWriter(conninfo_as("water_writer"))
    try:
        # a month with no partition: the writer has no DDL right, ensure_partitions does it
        w.write(frame("readings", {"node_id": [node] * 3, "ts": [start, start + 1, start + 2]}))
        w.write(frame("readings", {"node_id": [node], "ts": [start], "flow_rate": [7.5]}))
    finally:
        w.close()
    part = f"readings_p{month:%Y%m}"
    with psycopg.connect(conninfo_as("water_reader"), autocommit=True) as reader:
        # through the parent (what Grafana queries) and the new partition itself
        assert reader.execute(
            "SELECT count(*), sum(flow_rate) FROM water.readings WHERE node_id = %s", (node,)
        ).fetchone() == (3, 7.5)
        assert reader.execute(f"SELECT count(*) FROM water.{part}").fetchone()[0] >= 3


@pytest.mark.parametrize(
    "table,col",
    [
        ("readings", "ts"),
        ("kpi_15m", "window_start"),
        ("kpi_daily", "day"),
        ("quarantine", "received_at"),
    ],
)
def test_reader_cannot_write_any_way(conninfo_as, table, col):
    with psycopg.connect(conninfo_as("water_reader"), autocommit=True) as reader:
        reader.execute(f"SELECT count(*) FROM water.{table}")
        for stmt in WRITES:
            # privileges are checked before any constraint (quarantine.id NULL here)
            query = stmt.format(t=table, c=col)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(query)


def test_reader_cannot_write_a_partition_nor_create_or_run_ddl(conninfo_as, pg):
    pg.execute("SELECT water.ensure_partitions('water.readings', '1949-12-05+00', '1949-12-05+00')")
    with psycopg.connect(conninfo_as("water_reader"), autocommit=True) as reader:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("INSERT INTO water.readings_p194912 (node_id, ts) VALUES ('x', now())")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("CREATE TABLE water.reader_was_here (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("SELECT water.ensure_partitions('water.readings', now(), now())")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("DROP TABLE water.readings_p194912")


def test_writer_cannot_change_the_schema(conninfo_as, pg):
    pg.execute("SELECT water.ensure_partitions('water.readings', '1949-11-05+00', '1949-11-05+00')")
    with psycopg.connect(conninfo_as("water_writer"), autocommit=True) as writer:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("CREATE TABLE water.writer_was_here (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("DROP TABLE water.readings_p194911")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("ALTER TABLE water.readings DETACH PARTITION water.readings_p194911")
