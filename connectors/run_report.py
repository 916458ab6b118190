"""What a finished run left in the warm tier, read back for the summary at the end of a replay.

The summary is read from PostgreSQL rather than from counters in memory, so what it shows is
what the dashboards will show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

# The nodes a run brought readings for (a constant fragment: every value is a parameter).
_TOUCHED = "SELECT DISTINCT node_id FROM water.readings WHERE run_id = %s"


@dataclass(slots=True)
class RunReport:
    """The ``ingest_runs`` row of one run, with its quarantine reasons and what it touched."""

    run_id: str
    rows_in: int
    accepted: int
    quarantined: int
    duplicates: int
    values_quarantined: int
    late: int
    state: str  # running | finished | interrupted (water.run_status)
    nodes: int
    first_ts: str | None
    last_ts: str | None
    reasons: dict[str, int] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)
    kpi_15m: int = 0
    kpi_daily: int = 0


def start_run(
    conninfo: str, run_id: str, source: str, started_at_us: int, heartbeat_s: float
) -> None:
    """Record a run as running before its flow starts, so even a run killed at once is seen.

    A resumed run (same id, from its recovery folder) keeps its row: the flow's next
    heartbeat brings it up to date.
    """
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        conn.execute(
            "INSERT INTO water.ingest_runs (run_id, started_at, source, rows_in, accepted,"
            " quarantined, duplicates, values_quarantined, late, status, updated_at,"
            " heartbeat_s) VALUES (%s, to_timestamp(%s / 1e6), %s, 0, 0, 0, 0, 0, 0,"
            " 'running', now(), %s) ON CONFLICT (run_id) DO NOTHING",
            (run_id, started_at_us, source, heartbeat_s),
        )


def finish_run(conninfo: str, run_id: str) -> bool:
    """Mark a run finished, once the flow returned (every tier committed); False if no row."""
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        cur = conn.execute(
            "UPDATE water.ingest_runs SET status = 'finished', finished_at = now(),"
            " updated_at = now() WHERE run_id = %s",
            (run_id,),
        )
        return cur.rowcount == 1


def read_run_report(conninfo: str, run_id: str) -> RunReport | None:
    """The report of ``run_id``, or None when the run left no ``ingest_runs`` row."""
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT rows_in, accepted, quarantined, duplicates, values_quarantined, late, state"
            " FROM water.run_status WHERE run_id = %s",
            (run_id,),
        ).fetchone()
        if row is None:
            return None
        nodes, first_ts, last_ts = conn.execute(
            "SELECT count(DISTINCT node_id), min(ts)::text, max(ts)::text"
            " FROM water.readings WHERE run_id = %s",
            (run_id,),
        ).fetchone() or (0, None, None)
        reasons: dict[str, int] = dict(
            conn.execute(
                "SELECT reason, count(*) FROM water.quarantine WHERE run_id = %s"
                " GROUP BY reason ORDER BY count(*) DESC, reason",
                (run_id,),
            ).fetchall()
        )
        anomalies: dict[str, int] = dict(
            conn.execute(
                # _TOUCHED is a constant with a %s placeholder; run_id goes in as a parameter.
                "SELECT kind, count(*) FROM water.anomalies WHERE node_id IN (" + _TOUCHED + ")"  # nosec B608
                " GROUP BY kind ORDER BY count(*) DESC, kind",
                (run_id,),
            ).fetchall()
        )
        (kpi_15m,) = conn.execute(
            # A constant (_TOUCHED too); run_id and the range go in as parameters.
            "SELECT count(*) FROM water.kpi_15m WHERE node_id IN (" + _TOUCHED + ")"  # nosec B608
            " AND window_start BETWEEN %s::timestamptz AND %s::timestamptz",
            (run_id, first_ts, last_ts),
        ).fetchone() or (0,)
        (kpi_daily,) = conn.execute(
            # A constant (_TOUCHED too); run_id and the range go in as parameters.
            "SELECT count(*) FROM water.kpi_daily WHERE node_id IN (" + _TOUCHED + ")"  # nosec B608
            " AND day BETWEEN %s::timestamptz::date - 1 AND %s::timestamptz::date + 1",
            (run_id, first_ts, last_ts),
        ).fetchone() or (0,)
    rows_in, accepted, quarantined, duplicates, values_quarantined, late, state = row
    return RunReport(
        run_id=run_id,
        rows_in=rows_in,
        accepted=accepted,
        quarantined=quarantined,
        duplicates=duplicates,
        values_quarantined=values_quarantined,
        late=late,
        state=state,
        nodes=nodes,
        first_ts=first_ts,
        last_ts=last_ts,
        reasons=reasons,
        anomalies=anomalies,
        kpi_15m=kpi_15m,
        kpi_daily=kpi_daily,
    )
