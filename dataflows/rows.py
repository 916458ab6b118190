"""Pure mappings from the dataflow's records to the contract's table rows.

No I/O here: every tier takes the ``TableRows`` these functions build, and tests check them
without any service (STYLE.md, "Pure row-mapping functions").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace  # noqa: F401 (replace: the doctest)

import numpy as np

from dataflows.model import (
    MEASUREMENTS,
    AnomalyEvent,
    Flag,
    NodeInfo,
    Quarantined,
    ReadingBatch,
    flag_names,
)
from dataflows.tables import SCHEMAS, Coded, TableRows, frame


def _flag_lists(bits: np.ndarray | None, n: int) -> Coded:
    """Flag names per reading: the bitmask is the code into every list of names there is."""
    if bits is None:
        return Coded(np.zeros(n, np.int64), _FLAG_LISTS)
    return Coded(bits.astype(np.int64, copy=False), _FLAG_LISTS)


#: The flag names of every bitmask, the same list object for every batch (joined batches
#: then share it: ``tables.Coded``).
_FLAG_LISTS = [flag_names(bits) for bits in range(1 << len(Flag))]


def readings_rows(batch: ReadingBatch, run_id: str) -> TableRows:
    """Rows of the ``readings`` table for one scored node batch."""
    n = len(batch)
    columns: dict[str, object] = {
        "node_id": Coded.repeat(batch.node_id, n),
        "ts": batch.ts,  # µs since the epoch
        "quality": batch.quality if batch.quality is not None else np.ones(n),
        "flags": _flag_lists(batch.flags, n),
        "anomaly_score": batch.score if batch.score is not None else np.full(n, np.nan),
        "source": Coded.repeat(batch.source, n),
        "run_id": Coded.repeat(run_id, n),
    }
    for i, m in enumerate(MEASUREMENTS):
        columns[m] = batch.values[:, i]
    return frame("readings", columns)


def quarantine_id(q: Quarantined) -> str:
    """A stable id, so replaying the same file upserts its quarantine records, never duplicates."""
    key = "\x1f".join(
        [q.source, str(q.line), q.reason, q.node_id or "", q.measurement or "", q.raw]
    )
    return hashlib.sha1(key.encode("utf-8", "replace"), usedforsecurity=False).hexdigest()[:24]


def quarantine_rows(records: list[Quarantined], run_id: str, received_at_us: int) -> TableRows:
    """Rows of the ``quarantine`` table."""
    n = len(records)
    return frame(
        "quarantine",
        {
            "id": [quarantine_id(q) for q in records],
            "run_id": [run_id] * n,
            "source": [q.source for q in records],
            "line": [q.line for q in records],
            "node_id": [q.node_id for q in records],
            "ts": [q.ts for q in records],  # µs since the epoch, or None when unreadable
            "measurement": [q.measurement for q in records],
            "reason": [q.reason for q in records],
            # PostgreSQL text cannot hold NUL; keep everything else of the raw record as it came.
            "raw": [q.raw.replace("\x00", "\\x00") for q in records],
            "whole_reading": [q.whole_reading for q in records],
            "received_at": np.full(n, received_at_us, dtype=np.int64).astype("datetime64[us]"),
        },
    )


def _records_rows(table: str, records: Sequence[object]) -> TableRows:
    """Rows of ``table`` from records whose attributes bear the table's column names."""
    return frame(table, {col: [getattr(r, col) for r in records] for col in SCHEMAS[table]})


def nodes_rows(nodes: Iterable[NodeInfo]) -> TableRows:
    """Rows of the ``nodes`` table."""
    return _records_rows("nodes", list(nodes))


def events_rows(events: list[AnomalyEvent]) -> TableRows:
    """Rows of the ``anomalies`` table; for an id reported several times, the last state wins.

    >>> ev = AnomalyEvent("a", "n1", "flow_rate", "leak", 0, None, 0.9, 1.0, 2.0, 3.0)
    >>> events_rows([ev, replace(ev, ended_at=60_000_000)]).frame.height
    1
    """
    return _records_rows("anomalies", list({e.anomaly_id: e for e in events}.values()))


@dataclass(slots=True)
class RunCounts:
    """The run's ledger. ``rows_in == accepted + quarantined + duplicates`` when it is complete.

    ``values_quarantined`` counts single values removed from accepted readings and ``late`` the
    accepted readings that arrived after their KPI window closed (kept as raw readings).
    """

    rows_in: int = 0
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    values_quarantined: int = 0
    late: int = 0

    def __add__(self, other: RunCounts) -> RunCounts:
        return RunCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def reconciled(self) -> bool:
        return self.rows_in == self.accepted + self.quarantined + self.duplicates


def run_rows(
    run_id: str,
    source: str,
    started_at_us: int,
    updated_at_us: int,
    counts: RunCounts,
    heartbeat_s: float = 10.0,
) -> TableRows:
    """The run's row of ``ingest_runs`` while it runs: ``finished_at`` stays empty.

    Only the command that ran the flow marks it finished, after every tier committed.
    """
    return frame(
        "ingest_runs",
        {
            "run_id": [run_id],
            "started_at": np.array([started_at_us]).astype("datetime64[us]"),
            "finished_at": [None],
            "source": [source],
            **{f.name: [getattr(counts, f.name)] for f in fields(counts)},
            "status": ["running"],
            "updated_at": np.array([updated_at_us]).astype("datetime64[us]"),
            "heartbeat_s": [heartbeat_s],
        },
    )
