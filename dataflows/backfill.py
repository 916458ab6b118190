"""Rebuild the warm tier from the cold archive (disaster recovery, DESIGN.md "Storage tiers").

The cold tier keeps every accepted reading with its quality, flags and anomaly score. From
them, :class:`Rebuild` gives back what the pipeline wrote to the warm tier:

- ``readings``: exactly as archived (the original run_id, quality, flags and score);
- ``kpi_15m`` and ``kpi_daily``: recomputed by the pipeline's own ``NodeWindows``, one per node,
  fed the node's readings in time order. Readings flagged LATE are left out, as the pipeline
  left them out of every window;
- ``anomalies``: recomputed by the pipeline's ``NodeScorer`` on the same batches. Scores are
  deterministic and depend on how readings are cut into batches only through float rounding
  (the scorer sums per batch: differences under 1e-12 on the samples cut into batches of 97,
  288 or one UTC day), so for a node whose readings arrived in time order the re-run gives the
  archived scores. Each node's recomputed scores are checked against the archived ones (to
  ``SCORE_TOLERANCE``); only nodes whose scores all agree get their anomalies written, the
  others are reported (``Rebuild.score_mismatches``) and keep no anomalies;
- ``district_balance`` and the districts' leak events: the rebuilt 15-minute rows fed to the
  pipeline's ``DistrictBalance`` as they come (needs the network topology, like the pipeline);
- ``nodes``: the nodes seen, completed by the topology. Display names that came only from
  a source file are not in the archive: they are left NULL (an existing name is kept).

Not rebuilt, because the cold tier does not hold them: ``quarantine`` and ``ingest_runs``.
Readings that arrived out of time order were windowed in arrival order by the pipeline; the
archive keeps no arrival order, so windows holding such readings (flag OUT_OF_ORDER) may differ
in their totalizer volume. The time range should cover whole local days: the first and last
day's ``kpi_daily`` rows are otherwise computed from part of the day.

This module holds the logic only; :func:`backfill` composes a cold reader and a warm writer
given by the caller (``connectors``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from dataflows.anomaly import NodeScorer
from dataflows.balance import BalanceOutput, DistrictBalance, district_windows, new_balance
from dataflows.kpi import NodeWindows
from dataflows.model import MEASUREMENTS, AnomalyEvent, Flag, ReadingBatch
from dataflows.rows import events_rows
from dataflows.settings import CHUNK_ROWS_MAX, READINGS_PER_NODE_BATCH, Settings
from dataflows.tables import TableRows, concat_by_table, frame

_FLAG_BITS = {f.name or "": int(f) for f in Flag}
#: The whole archive, when no --since/--until is given: the range of a BigQuery TIMESTAMP
#: (0001-01-01 up to 9999-12-31), which also holds every day a Parquet archive can name.
ARCHIVE_START_US = -62_135_596_800_000_000
ARCHIVE_END_US = 253_402_214_400_000_000
#: Largest difference between a recomputed and an archived anomaly score taken as equal: far
#: above float rounding (1e-12), far below anything that moves an incident threshold.
SCORE_TOLERANCE = 1e-9


def flag_bits(flags: pl.Series) -> np.ndarray:
    """The int64 bitmask of each reading's list of flag names (the inverse of the tables').

    >>> flag_bits(pl.Series([["LATE", "STUCK"], []])).tolist()
    [10, 0]
    """
    bits = flags.list.eval(pl.element().replace_strict(_FLAG_BITS, return_dtype=pl.Int64))
    return bits.list.sum().fill_null(0).to_numpy().astype(np.int64)


def node_batches(readings: pl.DataFrame) -> Iterator[ReadingBatch]:
    """Each node's archived readings as the scored batch the pipeline windowed, in time order.

    Nodes come in the order of their first reading in ``readings``. The frame is converted to
    numpy once and cut per node: converting each node's rows on their own cost more than
    scoring and windowing them.

    >>> day = frame("readings", {"node_id": ["b", "a", "b"], "ts": np.array([600, 0, 0]),
    ...                          "flow_rate": [2.0, 5.0, 1.0], "flags": [["LATE"], [], []]})
    >>> [(b.node_id, b.ts.tolist(), b.flags.tolist()) for b in node_batches(day.frame)]
    [('b', [0, 600], [0, 2]), ('a', [0], [0])]
    """
    first = readings.select(pl.col("node_id").unique(maintain_order=True)).with_row_index("_node")
    rows = readings.join(first, on="node_id", how="left", maintain_order="left").sort(
        "_node", "ts", maintain_order=True
    )
    n = rows.height
    starts = np.flatnonzero(np.diff(rows["_node"].to_numpy().astype(np.int64), prepend=-1))
    bounds = np.append(starts, n)
    ts = rows["ts"].dt.epoch("us").to_numpy().astype(np.int64)
    values = np.column_stack(
        [rows[m].cast(pl.Float64).fill_null(np.nan).to_numpy() for m in MEASUREMENTS]
    ).reshape(n, len(MEASUREMENTS))
    quality = rows["quality"].fill_null(np.nan).to_numpy().astype(np.float64)
    flags = flag_bits(rows["flags"])
    score = rows["anomaly_score"].fill_null(np.nan).to_numpy().astype(np.float64)
    node_ids = rows["node_id"].gather(starts).to_list()
    sources = rows["source"].gather(starts).to_list()
    for a, b, node_id, source in zip(bounds[:-1], bounds[1:], node_ids, sources, strict=True):
        # Copies: the node's state may keep its arrays, and must not keep the whole day alive.
        yield ReadingBatch(
            node_id=str(node_id),
            source=str(source or ""),
            ts=ts[a:b].copy(),
            values=values[a:b].copy(),
            line=np.zeros(b - a, dtype=np.int64),
            quality=quality[a:b].copy(),
            flags=flags[a:b].copy(),
            score=score[a:b].copy(),
        )


@dataclass
class Rebuild:
    """Per-node windows and scorers fed a chunk of days at a time; rows to upsert."""

    settings: Settings
    windows: dict[str, NodeWindows] = field(default_factory=dict)
    scorers: dict[str, NodeScorer] = field(default_factory=dict)
    events: dict[str, list[AnomalyEvent]] = field(default_factory=dict)
    #: Node -> readings whose recomputed score differs from the archived one.
    score_mismatches: dict[str, int] = field(default_factory=dict)
    #: Node -> readings whose score was compared.
    scored: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    balances: dict[str, DistrictBalance] = field(default_factory=dict)

    def day(self, readings: pl.DataFrame) -> list[TableRows]:
        """Rows for one frame of archived readings (one or more whole UTC days, in order)."""
        out = [TableRows("readings", readings)]
        kpis: list[TableRows] = []
        for batch in node_batches(readings):
            self._node(batch, kpis)
        out.extend(concat_by_table(kpis))
        return out

    def _node(self, batch: ReadingBatch, kpis: list[TableRows]) -> None:
        node_id = batch.node_id
        self.sources.setdefault(node_id, batch.source)
        assert batch.flags is not None and batch.score is not None  # set by node_batches
        # The scorer ran before the windows set LATE: it must see the flags it saw then.
        before_windows = batch.flags & ~int(Flag.LATE)
        scorer = self.scorers.get(node_id) or NodeScorer(node_id, self.settings)
        self.scorers[node_id] = scorer
        scores, events = scorer.score(_with(batch, flags=before_windows))
        close = np.abs(scores - batch.score) <= SCORE_TOLERANCE
        differs = ~(close | (np.isnan(scores) & np.isnan(batch.score)))
        self.score_mismatches[node_id] = self.score_mismatches.get(node_id, 0) + int(differs.sum())
        self.scored[node_id] = self.scored.get(node_id, 0) + len(batch)
        self.events.setdefault(node_id, []).extend(events)

        windows = self.windows.get(node_id) or NodeWindows(node_id, self.settings)
        self.windows[node_id] = windows
        on_time = (batch.flags & int(Flag.LATE)) == 0
        if on_time.any():
            # The archived scores, not the recomputed ones: score_max is the pipeline's.
            out = windows.update(_with(batch.take(on_time), flags=before_windows[on_time]))
            assert not out.late.any(), "readings in time order cannot be late"
            self._keep(node_id, out.kpi_15m, out.kpi_daily, kpis)

    def _keep(
        self, node_id: str, k15: TableRows | None, daily: TableRows | None, kpis: list[TableRows]
    ) -> None:
        for rows in (k15, daily):
            if rows is not None:
                kpis.append(rows)
        keyed = district_windows(self.settings.network, node_id, k15)
        if keyed is not None:
            district, meter = keyed
            balance = self.balances.get(district) or new_balance(self.settings, district)
            self.balances[district] = balance
            self._balance_out(balance.update(meter), kpis)

    def _balance_out(self, out: BalanceOutput, kpis: list[TableRows]) -> None:
        if out.rows is not None:
            kpis.append(out.rows)
        if out.events:
            kpis.append(events_rows(out.events))

    def finish(self) -> list[TableRows]:
        """The rows only the end of input gives: anomalies, balance, nodes.

        Open KPI windows are not flushed, as in the pipeline: every row ``NodeWindows.flush``
        would give was emitted, with the same values, by the update that last changed it; they
        were written twice, and the district balance, fed them again, recomputed its open days.
        """
        out: list[TableRows] = []
        kpis: list[TableRows] = []
        for balance in self.balances.values():
            self._balance_out(balance.flush(), kpis)
        out.extend(concat_by_table(kpis))
        events = [
            e
            for node, scorer in self.scorers.items()
            if self.score_mismatches.get(node, 0) == 0
            for e in [*self.events.get(node, []), *scorer.flush()]
        ]
        if events:
            out.append(events_rows(events))
        if self.sources:
            out.append(self._nodes())
        return out

    def _nodes(self) -> TableRows:
        network = self.settings.network
        ids = sorted(self.sources)
        specs = [network.nodes.get(n) for n in ids]
        return frame(
            "nodes",
            {
                "node_id": ids,
                "name": [s.name if s else None for s in specs],
                "district": [s.district if s else None for s in specs],
                "role": [s.role if s else None for s in specs],
                "lat": [s.lat if s else None for s in specs],
                "lon": [s.lon if s else None for s in specs],
                "source": [self.sources[n] for n in ids],
            },
        )

    @property
    def anomalies_skipped(self) -> list[str]:
        """Nodes whose anomalies were not rebuilt (recomputed scores differ from the archive)."""
        return sorted(n for n, k in self.score_mismatches.items() if k)


def _with(batch: ReadingBatch, *, flags: np.ndarray) -> ReadingBatch:
    return replace(batch, flags=flags)


def chunks(days: Iterable[pl.DataFrame]) -> Iterator[tuple[int, pl.DataFrame]]:
    """Consecutive days joined until a node has about as many readings as the replay gives it.

    Each call of a node's windows and scorer has a fixed cost, so sparse readings (hourly, or
    a few a day) are fed several days at once: days are joined while the chunk holds fewer
    than ``READINGS_PER_NODE_BATCH`` readings per node and fewer than ``CHUNK_ROWS_MAX`` in
    all, the replay's own bounds. Dense days (5-minute readings) stay one a chunk. Yields
    (days joined, their readings).

    >>> day = frame("readings", {"node_id": ["a"] * 150, "ts": np.arange(150)}).frame
    >>> [(n, f.height) for n, f in chunks([day, day, day])]
    [(2, 300), (1, 150)]
    """
    held: list[pl.DataFrame] = []
    rows = nodes = 0
    for readings in days:
        held.append(readings)
        rows += readings.height
        nodes = max(nodes, readings["node_id"].n_unique())
        if rows >= min(READINGS_PER_NODE_BATCH * nodes, CHUNK_ROWS_MAX):
            yield len(held), held[0] if len(held) == 1 else pl.concat(held, how="vertical")
            held, rows, nodes = [], 0, 0
    if held:
        yield len(held), held[0] if len(held) == 1 else pl.concat(held, how="vertical")


@dataclass
class BackfillReport:
    """What a backfill wrote, per table, and what it could not rebuild."""

    rows: dict[str, int]
    days: int
    anomalies_skipped: list[str]
    scores_compared: int


def backfill(
    days: Iterable[pl.DataFrame],
    write: Callable[[TableRows], None],
    settings: Settings,
) -> BackfillReport:
    """Feed the archived readings (one frame per UTC day, in order) and write every row.

    Days are recomputed in :func:`chunks` (one day, or several when readings are sparse). A
    chunk's rows are written on a thread of their own while the next chunk is read and
    recomputed (the server's work overlaps with ours), and each write is waited for before the
    next one starts: rows reach ``write`` in order, from one thread at a time, so memory holds
    at most two chunks of readings (each one day, or under about ``CHUNK_ROWS_MAX`` readings)
    plus the per-node state. A failed write raises here, at the latest one chunk later. The
    writer upserts, so a backfill run twice (or after a failure part way) leaves the same
    tables.

    >>> day = frame("readings", {"node_id": ["a"], "ts": np.array([0]), "flags": [[]]}).frame
    >>> written: list[str] = []
    >>> backfill([day], lambda rows: written.append(rows.table), Settings(tz="UTC")).rows
    {'readings': 1, 'kpi_15m': 1, 'kpi_daily': 1, 'nodes': 1}
    >>> written  # in order: the day's rows, then what only the end gives (no window again)
    ['readings', 'kpi_15m', 'kpi_daily', 'nodes']
    >>> def refuse(rows: TableRows) -> None:
    ...     raise OSError(f"disk full writing {rows.table}")
    >>> backfill([day, day], refuse, Settings(tz="UTC"))
    Traceback (most recent call last):
    ...
    OSError: disk full writing readings
    """
    rebuild = Rebuild(settings)
    counts: dict[str, int] = {}
    n_days = 0
    in_flight: Future[None] | None = None

    def write_all(rows: list[TableRows]) -> None:
        for r in rows:
            write(r)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-write") as writer:

        def emit(rows: Iterable[TableRows]) -> None:
            nonlocal in_flight
            kept = [r for r in rows if r.height]
            if in_flight is not None:
                in_flight.result()  # the chunk before: written, or its failure raised here
            in_flight = writer.submit(write_all, kept)
            for r in kept:
                counts[r.table] = counts.get(r.table, 0) + r.height

        try:
            for n, readings in chunks(days):
                n_days += n
                emit(rebuild.day(readings))
            emit(rebuild.finish())
            if in_flight is not None:
                in_flight.result()
        except BaseException:
            if in_flight is not None:
                in_flight.cancel()  # not started yet: nothing more is written after a failure
            raise
    return BackfillReport(
        rows=counts,
        days=n_days,
        anomalies_skipped=rebuild.anomalies_skipped,
        scores_compared=sum(rebuild.scored.values()),
    )
