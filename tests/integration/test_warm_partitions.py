"""Warm tier partitions (migration 0003) against the real PostgreSQL, each test in its own DB."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import psycopg
import pytest

from connectors.warm_postgres import WarmPostgresWriter, batch_months, migrate, migration_files
from dataflows.model import US_PER_S
from dataflows.tables import frame
from tests.integration.conftest import fresh_database
from tests.integration.warm_db import month_bound, partitions, rows_per_partition

pytestmark = pytest.mark.integration

UTC = dt.UTC


def us(*args: int) -> int:
    """Microseconds since the epoch of a UTC date-time."""
    return int(dt.datetime(*args, tzinfo=UTC).timestamp() * US_PER_S)


@pytest.fixture
def db() -> Iterator[str]:
    with fresh_database() as url:
        migrate(url)
        yield url


@pytest.fixture
def writer(db: str) -> Iterator[WarmPostgresWriter]:
    w = WarmPostgresWriter(db, backoff_s=0.05)
    yield w
    w.close()


def readings(node: str, ts_us: list[int], flow: list[float] | None = None):
    return frame(
        "readings",
        {"node_id": [node] * len(ts_us), "ts": ts_us, "flow_rate": flow or [1.0] * len(ts_us)},
    )


def test_migration_partitions_existing_rows_and_keeps_them():
    """A database at 0002 with rows in 2021 and 2024 comes out of 0003 with the same rows."""
    files = dict(migration_files())
    with fresh_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA water")
            conn.execute(
                "CREATE TABLE water.schema_migrations (version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version in ("0001_initial", "0002_roles"):
                with conn.transaction():
                    conn.execute(files[version].encode())
                    conn.execute("INSERT INTO water.schema_migrations VALUES (%s)", (version,))
            conn.execute(
                "INSERT INTO water.readings (node_id, ts, flow_rate, flags) VALUES"
                " ('a', '2021-01-31 23:59:59.999999+00', 1.5, '{LATE}'),"
                " ('a', '2021-02-01 00:00:00+00', 2.5, NULL),"
                # 00:30 local time in Rome on 1 March is still February in UTC
                " ('b', '2021-03-01 00:30:00+01', 4.0, '{}'),"
                " ('b', '2024-06-10 12:00:00+00', 8.0, NULL)"
            )
            conn.execute(
                "INSERT INTO water.kpi_15m (node_id, window_start, n) VALUES"
                " ('a', '2021-01-31 23:45+00', 3), ('a', '2021-02-01 00:00+00', 3)"
            )
            conn.execute(
                "INSERT INTO water.kpi_daily (node_id, day, n) VALUES ('a', '2022-12-31', 9)"
            )
            before = conn.execute(
                "SELECT node_id, ts, flow_rate, flags FROM water.readings ORDER BY 1, 2"
            ).fetchall()

        # every migration from 0003 on (later ones are added by later issues)
        assert migrate(url) == [v for v, _ in migration_files() if v >= "0003"]

        with psycopg.connect(url, autocommit=True) as conn:
            kinds = dict(
                conn.execute(
                    "SELECT relname, relkind FROM pg_class"
                    " WHERE relnamespace = 'water'::regnamespace"
                    " AND relname IN ('readings', 'kpi_15m', 'kpi_daily', 'quarantine')"
                ).fetchall()
            )
            assert kinds == {"readings": "p", "kpi_15m": "p", "kpi_daily": "p", "quarantine": "r"}
            assert partitions(conn, "readings") == {
                "readings_p202101": month_bound("2021-01-01", "2021-02-01"),
                "readings_p202102": month_bound("2021-02-01", "2021-03-01"),
                "readings_p202406": month_bound("2024-06-01", "2024-07-01"),
            }
            assert rows_per_partition(conn, "readings") == {
                "readings_p202101": 1,
                "readings_p202102": 2,
                "readings_p202406": 1,
            }
            assert rows_per_partition(conn, "kpi_15m") == {
                "kpi_15m_p202101": 1,
                "kpi_15m_p202102": 1,
            }
            assert partitions(conn, "kpi_daily") == {
                "kpi_daily_p202212": "FOR VALUES FROM ('2022-12-01') TO ('2023-01-01')"
            }
            after = conn.execute(
                "SELECT node_id, ts, flow_rate, flags FROM water.readings ORDER BY 1, 2"
            ).fetchall()
            assert after == before
            # the old tables are gone, and no DEFAULT partition exists anywhere
            assert conn.execute(
                "SELECT to_regclass('water.readings_unpartitioned')"
            ).fetchone() == (None,)
            (defaults,) = conn.execute(
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'water'::regnamespace"
                " AND relispartition AND pg_get_expr(relpartbound, oid) = 'DEFAULT'"
            ).fetchone()
            assert defaults == 0


def test_writer_creates_only_the_months_of_its_batches(writer, db):
    # 2021 history and one 2023 month: nothing is created for the months in between
    ts = [us(2021, 1, 31, 23, 59), us(2021, 2, 1), us(2021, 2, 15), us(2023, 11, 14)]
    writer.write(readings("n1", ts, [1.0, 2.0, 3.0, 4.0]))
    with psycopg.connect(db, autocommit=True) as conn:
        assert partitions(conn, "readings") == {
            "readings_p202101": month_bound("2021-01-01", "2021-02-01"),
            "readings_p202102": month_bound("2021-02-01", "2021-03-01"),
            "readings_p202311": month_bound("2023-11-01", "2023-12-01"),
        }
        assert rows_per_partition(conn, "readings") == {
            "readings_p202101": 1,
            "readings_p202102": 2,
            "readings_p202311": 1,
        }
        # upsert through the parent still matches the natural key
        writer.write(readings("n1", ts[:2], [10.0, 20.0]))
        assert conn.execute("SELECT count(*), sum(flow_rate) FROM water.readings").fetchone() == (
            4,
            37.0,
        )
    assert {m for t, m in writer._ensured if t == "readings"} == {
        dt.datetime(2021, 1, 1, tzinfo=UTC),
        dt.datetime(2021, 2, 1, tzinfo=UTC),
        dt.datetime(2023, 11, 1, tzinfo=UTC),
    }


def test_kpi_tables_partition_on_their_own_time_column(writer, db):
    writer.write(frame("kpi_15m", {"node_id": ["k"], "window_start": [us(2021, 7, 31, 23, 45)]}))
    writer.write(
        frame(
            "kpi_daily", {"node_id": ["k", "k"], "day": [dt.date(2021, 7, 31), dt.date(2021, 8, 1)]}
        )
    )
    with psycopg.connect(db, autocommit=True) as conn:
        assert partitions(conn, "kpi_15m") == {
            "kpi_15m_p202107": month_bound("2021-07-01", "2021-08-01")
        }
        assert rows_per_partition(conn, "kpi_daily") == {
            "kpi_daily_p202107": 1,
            "kpi_daily_p202108": 1,
        }


def test_batch_months_of_each_table():
    f = readings("x", [us(2021, 12, 31, 23, 59), us(2022, 1, 1), us(2022, 1, 20)]).frame
    assert batch_months("readings", f) == [
        dt.datetime(2021, 12, 1, tzinfo=UTC),
        dt.datetime(2022, 1, 1, tzinfo=UTC),
    ]
    days = frame("kpi_daily", {"node_id": ["x"], "day": [dt.date(2020, 2, 29)]}).frame
    assert batch_months("kpi_daily", days) == [dt.datetime(2020, 2, 1, tzinfo=UTC)]
    q = frame("quarantine", {"id": ["q"], "received_at": [us(2021, 1, 1)]}).frame
    assert batch_months("quarantine", q) == []


def test_partition_dropped_behind_the_writers_back_is_created_again(writer, db):
    writer.write(readings("d", [us(2021, 5, 3)]))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TABLE water.readings_p202105")
        # the writer still believes the month exists: its first try fails, then it re-ensures
        writer.write(readings("d", [us(2021, 5, 4)]))
        assert rows_per_partition(conn, "readings") == {"readings_p202105": 1}


def test_concurrent_writers_reaching_a_new_month_at_once(db):
    """Four workers writing the same new months at the same moment: no error, one partition each."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        w = WarmPostgresWriter(db, backoff_s=0.05)
        try:
            barrier.wait()
            w.write(
                readings(
                    f"c{i}",
                    [us(2022, 3, 1) + k * 60 * US_PER_S for k in range(3)] + [us(2022, 4, 9)],
                )
            )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            w.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(db, autocommit=True) as conn:
        assert rows_per_partition(conn, "readings") == {
            "readings_p202203": 12,
            "readings_p202204": 4,
        }


def test_node_time_query_prunes_to_one_partition_and_has_its_index(writer, db):
    ts = [us(2021, m, 10) for m in range(1, 7)]
    writer.write(readings("g", ts))
    with psycopg.connect(db, autocommit=True) as conn:
        plan = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT ts, flow_rate FROM water.readings"
            " WHERE node_id = 'g' AND ts >= '2021-03-02+00' AND ts < '2021-03-20+00'"
        ).fetchone()[0]
        text = str(plan)
        assert "readings_p202103" in text
        assert all(f"readings_p20210{m}" not in text for m in (1, 2, 4, 5, 6))
        # every partition carries the (node_id, ts) key index and the BRIN on ts
        indexes = conn.execute(
            "SELECT tablename, indexdef FROM pg_indexes"
            " WHERE schemaname = 'water' AND tablename = 'readings_p202103'"
        ).fetchall()
        defs = " ".join(d for _, d in indexes)
        assert "UNIQUE INDEX readings_p202103_pkey" in defs and "(node_id, ts)" in defs
        assert "USING brin (ts)" in defs


def test_ensure_partitions_refuses_what_is_not_partitioned(db):
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="not range-partitioned"):
            conn.execute(
                "SELECT water.ensure_partitions('water.quarantine', now(), now())"
            ).fetchall()
        created = conn.execute(
            "SELECT water.ensure_partitions('water.readings', '2020-11-15+00', '2021-01-02+00')"
        ).fetchall()
        assert [r[0] for r in created] == [
            "readings_p202011",
            "readings_p202012",
            "readings_p202101",
        ]
        again = conn.execute(
            "SELECT water.ensure_partitions('water.readings', '2020-11-15+00', '2021-01-02+00')"
        ).fetchall()
        assert again == []
