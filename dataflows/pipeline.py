"""The main dataflow: parse, validate, score, window, and fan out to the storage tiers.

``build_flow`` takes its source and sink as arguments, so tests feed it a ``TestingSource``
of ``ParsedChunk``s and a ``TestingSink``, replays feed it the CSV ``FileSource``, and
production feeds it Kafka. Items travel as per-node batches of numpy arrays (DESIGN.md,
"Performance design"); each stateful step holds one small object per node.
"""

from __future__ import annotations

import copy

# Only our own recovery snapshots are unpickled (_PerNode).
import pickle  # nosec B403
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Generic, TypeVar

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulLogic
from bytewax.outputs import Sink

from dataflows import observe
from dataflows.anomaly import NodeScorer
from dataflows.balance import BalanceOutput, DistrictBalance, district_windows, new_balance
from dataflows.balance_fill import MeterWindows
from dataflows.forecast import (
    ClosedDay,
    DistrictForecaster,
    ForecastOut,
    NodeForecaster,
    closed_days_by_district,
    district_meters,
)
from dataflows.kpi import NodeWindows, WindowOutput
from dataflows.model import AnomalyEvent, Flag, ParsedChunk, Quarantined, ReadingBatch
from dataflows.rows import (
    RunCounts,
    events_rows,
    nodes_rows,
    quarantine_rows,
    readings_rows,
    run_rows,
)
from dataflows.settings import Settings
from dataflows.tables import TableRows
from dataflows.validation import NodeValidator, Validated

S = TypeVar("S")
V = TypeVar("V")
Out = TypeVar("Out")


def _now_us() -> int:
    return time.time_ns() // 1000


class _GatherOnTicks(StatefulLogic[ReadingBatch, ReadingBatch, list[ReadingBatch]]):
    """One node's batches gathered until the next tick of the wall clock, then passed on as one.

    Ticks are multiples of ``tick`` since the epoch, the same for every node, so the nodes
    waiting release together in one activation: the steps after it, and the sink, take one
    large batch per tick instead of one per node spread over the interval (a write per table
    per tick and worker). A batch waits less than one tick; a node with ``most`` batches
    waiting goes at once. A tick of 0 passes every batch on as it comes (a replay's chunks
    are large already). What waits is in the snapshot, so a crash loses none of it.
    """

    def __init__(self, resume: list[ReadingBatch] | None, tick: timedelta, most: int) -> None:
        self._waiting = resume or []
        self._tick_us = tick // timedelta(microseconds=1)
        self._most = most
        self._due: datetime | None = self._next_tick() if self._waiting else None

    def _next_tick(self) -> datetime:
        tick = self._tick_us
        return datetime.fromtimestamp((_now_us() // tick + 1) * tick / 1e6, UTC)

    def _release(self) -> tuple[list[ReadingBatch], bool]:
        """Everything waiting as one batch (none if nothing waits); the node's logic ends."""
        waiting, self._waiting, self._due = self._waiting, [], None
        out = [ReadingBatch.concat(waiting) if len(waiting) > 1 else waiting[0]] if waiting else []
        return out, StatefulLogic.DISCARD

    def on_item(self, value: ReadingBatch) -> tuple[Iterable[ReadingBatch], bool]:
        if self._tick_us <= 0:
            return [value], StatefulLogic.DISCARD
        self._waiting.append(value)
        if len(self._waiting) >= self._most:
            return self._release()
        if self._due is None:
            self._due = self._next_tick()
        return [], StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._due

    def on_notify(self) -> tuple[Iterable[ReadingBatch], bool]:
        return self._release()

    def on_eof(self) -> tuple[Iterable[ReadingBatch], bool]:
        return self._release()

    def snapshot(self) -> list[ReadingBatch]:
        return list(self._waiting)


@dataclass(slots=True)
class Scored:
    """A node batch with its anomaly scores, and the events the batch opened or changed."""

    batch: ReadingBatch
    events: list[AnomalyEvent]


@dataclass(slots=True)
class Windowed:
    """A scored node batch with LATE flags set, and the KPI rows it created or changed."""

    batch: ReadingBatch | None
    windows: WindowOutput


class _PerNode(StatefulLogic[V, Out, bytes | None], Generic[V, S, Out]):
    """Bytewax logic around one node's object: built on its first item, flushed at the end.

    Bytewax's builder is not told the key, so the object is made when the first item names
    its node. Its snapshot is the object pickled (see ``snapshot``), or None in a flow that
    keeps no snapshots (``build_flow(..., snapshots=False)``). ``resumed`` is called on an
    object read back from a snapshot, to give it what the run's configuration says now.
    """

    def __init__(
        self,
        resume: bytes | None,
        make: Callable[[V], S],
        step: Callable[[S, V], Out],
        flush: Callable[[S], Iterable[Out]],
        snapshots: bool = True,
        resumed: Callable[[S], None] | None = None,
    ) -> None:
        # resume is what snapshot() pickled, read back from the run's own recovery folder: no
        # outside input, so trusting it is trusting the deployment.
        self._state: S | None = pickle.loads(resume) if resume is not None else None  # noqa: S301  # nosec B301
        if self._state is not None and resumed is not None:
            resumed(self._state)
        self._make = make
        self._step = step
        self._flush = flush
        self._snapshots = snapshots

    def on_item(self, value: V) -> tuple[Iterable[Out], bool]:
        if self._state is None:
            self._state = self._make(value)
        return [self._step(self._state, value)], StatefulLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[Out], bool]:
        if self._state is None:
            return [], StatefulLogic.RETAIN
        return list(self._flush(self._state)), StatefulLogic.RETAIN

    def snapshot(self) -> bytes | None:
        assert self._state is not None  # Bytewax snapshots only keys that have seen an item
        if not self._snapshots:
            # Without recovery Bytewax still asks, and drops the answer: pickling every node's
            # objects for nothing was a tenth of a profiled 10 000-node replay.
            return None
        # Bytewax asks every key an epoch touched for a snapshot, recovery or not, and may
        # serialize it later, so it must not share the live object. Pickling it here is that
        # copy and the serialization at once, in C: in a profiled 10 000-node replay, 3.3 s of
        # pickling against 15 s of the copy.deepcopy Bytewax's stateful_map does (a fifth of
        # that replay's time).
        return pickle.dumps(self._state, protocol=pickle.HIGHEST_PROTOCOL)


class _Ledger(StatefulLogic[RunCounts, RunCounts, RunCounts]):
    """The run's running totals: a heartbeat every ``interval``, and the whole at the end.

    A live flow never ends, so its ``ingest_runs`` row is refreshed on the wall clock rather
    than written once at the end; the refresh also goes on while no reading comes, so a row
    whose heartbeat stopped means the run was interrupted (``water.run_status``). A heartbeat
    passes on the totals of one interval before: the rows they count have reached the sink
    and were written by then (a batch takes far less than an interval), so an interrupted
    run's row does not count readings the tiers never received.
    """

    def __init__(self, resume: RunCounts | None, interval: timedelta) -> None:
        self._total = resume or RunCounts()
        self._interval = interval
        self._held: RunCounts | None = None  # the totals at the last heartbeat
        self._due: datetime | None = None

    def on_item(self, value: RunCounts) -> tuple[Iterable[RunCounts], bool]:
        self._total = self._total + value
        if self._due is None:
            self._due = datetime.now(UTC) + self._interval
        return [], StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._due

    def on_notify(self) -> tuple[Iterable[RunCounts], bool]:
        out = [self._held] if self._held is not None else []
        self._held = copy.copy(self._total)
        self._due = datetime.now(UTC) + self._interval
        return out, StatefulLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[RunCounts], bool]:
        self._due = None
        return [self._total], StatefulLogic.RETAIN

    def snapshot(self) -> RunCounts:
        return copy.copy(self._total)


def _score_step(scorer: NodeScorer, batch: ReadingBatch) -> Scored:
    scores, events = scorer.score(batch)
    return Scored(replace(batch, score=scores), events)


def _score_flush(scorer: NodeScorer) -> list[Scored]:
    events = scorer.flush()
    return [Scored(_EMPTY_BATCH, events)] if events else []


def _window_step(windows: NodeWindows, scored: Scored) -> Windowed:
    if len(scored.batch) == 0:
        return Windowed(None, WindowOutput(np.zeros(0, bool), None, None))
    batch = scored.batch
    out = windows.update(batch)
    if out.late.any():
        assert batch.flags is not None  # set by validation
        batch = replace(batch, flags=np.where(out.late, batch.flags | Flag.LATE, batch.flags))
    return Windowed(batch, out)


_EMPTY_BATCH = ReadingBatch(
    node_id="",
    source="",
    ts=np.zeros(0, np.int64),
    values=np.zeros((0, 10)),
    line=np.zeros(0, np.int64),
)


def _no_flush(_state: object) -> list[Any]:
    """Nothing to write at the end of the input.

    Validators and district forecasters have nothing pending. KPI windows do not re-emit their
    open windows either: ``NodeWindows.flush`` would give rows already emitted, with the same
    values, by the update that last changed them, and writing them twice doubled a replay's
    KPI writes for the last ``allowed_lateness_s`` of every node.
    """
    return []


def _whole(records: list[Quarantined]) -> int:
    return sum(1 for q in records if q.whole_reading)


def build_flow(
    source: Source[ParsedChunk],
    sink: Sink[TableRows],
    settings: Settings,
    snapshots: bool = True,
) -> Dataflow:
    """The pipeline from parsed chunks to table rows, for any source and sink.

    ``snapshots=False`` for a flow run without recovery (a replay): the per-node steps then
    answer Bytewax's snapshot requests with None instead of pickling their state. A flow run
    with a recovery folder needs the default.
    """
    per_node = partial(_PerNode, snapshots=snapshots)
    flow = Dataflow("waterflow")
    run_id = settings.run_id
    network = settings.network

    chunks = op.input("read_readings", flow, source)
    # ParsedChunk
    tick = timedelta(milliseconds=settings.node_gather_ms)
    node_batches = op.stateful(
        "gather_by_node",
        op.flat_map(
            "split_by_node", chunks, lambda c: [(b.node_id, b) for b in c.batches if len(b)]
        ),
        lambda resume: _GatherOnTicks(resume, tick, settings.node_gather_max),
    )
    # (node_id, ReadingBatch): one node's readings of one chunk, or of several gathered
    def validator_logic(
        resume: bytes | None,
    ) -> _PerNode[ReadingBatch, NodeValidator, Validated]:
        make = lambda b: NodeValidator(b.node_id, settings)  # noqa: E731
        return per_node(resume, make, NodeValidator.validate, _no_flush)

    validated = op.stateful("validate", node_batches, validator_logic)
    # (node_id, Validated)
    accepted = op.filter_map_value(
        "keep_accepted", validated, lambda v: v.accepted if len(v.accepted) else None
    )
    # (node_id, ReadingBatch) with quality and flags
    def scorer_logic(resume: bytes | None) -> _PerNode[ReadingBatch, NodeScorer, Scored]:
        return per_node(
            resume, lambda b: NodeScorer(b.node_id, settings), _score_step, _score_flush
        )

    def window_logic(resume: bytes | None) -> _PerNode[Scored, NodeWindows, Windowed]:
        return per_node(
            resume, lambda s: NodeWindows(s.batch.node_id, settings), _window_step, _no_flush
        )

    scored = op.stateful("score_anomaly", accepted, scorer_logic)
    # (node_id, Scored)
    windowed = op.stateful("window_kpis", scored, window_logic)
    # (node_id, Windowed)

    def balance_logic(
        resume: bytes | None,
    ) -> _PerNode[MeterWindows, DistrictBalance, BalanceOutput]:
        return per_node(
            resume,
            lambda mw: new_balance(settings, _district_of(settings, mw.node_id)),
            DistrictBalance.update,
            lambda balance: [balance.flush()],
        )

    balances = op.stateful(
        "balance_by_district",
        op.flat_map("windows_by_district", windowed, _district_windows(settings)),
        balance_logic,
    )
    # (district, BalanceOutput): district_balance rows and district leak events

    def run_holidays(forecaster: NodeForecaster | DistrictForecaster) -> None:
        # A holiday added to the configuration counts from a restart on, for every forecaster.
        forecaster.series.use_holidays(settings.holidays)

    def forecast_logic(resume: bytes | None) -> Any:
        make = lambda b: NodeForecaster(b.node_id, settings.tz, settings.holidays)  # noqa: E731
        return per_node(
            resume, make, NodeForecaster.update, lambda f: [f.flush()], resumed=run_holidays
        )

    node_forecasts = op.stateful("forecast_demand", accepted, forecast_logic)
    # (node_id, ForecastOut): a node's forecasts issued at the local midnights it passed
    def district_forecast_logic(
        resume: bytes | None,
    ) -> _PerNode[ClosedDay, DistrictForecaster, ForecastOut]:
        make = _district_forecaster(settings)
        return per_node(resume, make, DistrictForecaster.update, _no_flush, resumed=run_holidays)

    district_forecasts = op.stateful(
        "forecast_by_district",
        op.flat_map(
            "closed_days_by_district",
            node_forecasts,
            lambda kv: closed_days_by_district(network, kv[1]),
        ),
        district_forecast_logic,
    )
    # (district, ForecastOut)

    received = _now_us()
    rows_streams = [
        op.flat_map(
            "node_rows",
            chunks,
            lambda c: [nodes_rows(network.node_info(n) for n in c.nodes)] if c.nodes else [],
        ),
        op.flat_map(
            "parse_quarantine_rows",
            chunks,
            lambda c: [quarantine_rows(c.quarantined, run_id, received)] if c.quarantined else [],
        ),
        op.flat_map(
            "validation_quarantine_rows",
            op.key_rm("validated_values", validated),
            lambda v: [quarantine_rows(v.quarantined, run_id, received)] if v.quarantined else [],
        ),
        op.flat_map(
            "anomaly_rows",
            op.key_rm("scored_values", scored),
            lambda s: [events_rows(s.events)] if s.events else [],
        ),
        op.flat_map(
            "reading_and_kpi_rows", op.key_rm("windowed_values", windowed), _window_rows(run_id)
        ),
        op.flat_map("balance_rows", op.key_rm("balance_values", balances), _balance_rows),
        op.flat_map(
            "forecast_rows",
            op.key_rm("forecast_values", op.merge("forecasts", node_forecasts, district_forecasts)),
            ForecastOut.rows,
        ),
    ]
    # TableRows

    counts = op.merge(
        "counts",
        op.map(
            "count_parsed",
            chunks,
            lambda c: RunCounts(
                rows_in=c.readings_in,
                quarantined=_whole(c.quarantined),
                values_quarantined=len(c.quarantined) - _whole(c.quarantined),
            ),
        ),
        op.map(
            "count_validated",
            op.key_rm("validated_counts", validated),
            lambda v: RunCounts(
                accepted=len(v.accepted),
                quarantined=_whole(v.quarantined),
                duplicates=v.duplicates,
                values_quarantined=len(v.quarantined) - _whole(v.quarantined),
            ),
        ),
        op.map(
            "count_late",
            op.key_rm("windowed_counts", windowed),
            lambda w: RunCounts(late=int(w.windows.late.sum())),
        ),
    )
    # RunCounts
    interval = timedelta(seconds=settings.ledger_interval_s)
    ledger = op.stateful(
        "ledger",
        op.key_on("one_ledger", counts, lambda _: "run"),
        lambda resume: _Ledger(resume, interval),
    )
    run_row = op.map(
        "run_row",
        op.key_rm("ledger_values", ledger),
        lambda c: run_rows(
            run_id, settings.source_label, settings.started_us, _now_us(), c,
            settings.ledger_interval_s,
        ),
    )
    rows_streams.append(run_row)

    # Prometheus: counts, per-node state, open anomalies (inspect steps: items pass unchanged).
    node_clocks = observe.NodeClocks()
    node_districts = observe.NodeDistricts(network)
    observe.record_network(network)
    op.inspect("observe_counts", counts, lambda _step, c: observe.record_counts(c))
    op.inspect("observe_node_info", chunks, lambda _s, c: node_districts.record(c.nodes))
    op.inspect(
        "observe_parse_quarantine", chunks, lambda _s, c: observe.record_quarantine(c.quarantined)
    )
    op.inspect(
        "observe_validation_quarantine",
        validated,
        lambda _s, kv: observe.record_quarantine(kv[1].quarantined),
    )
    op.inspect(
        "observe_nodes",
        windowed,
        lambda _s, kv: node_clocks.record(kv[1].batch) if kv[1].batch is not None else None,
    )
    op.inspect(
        "observe_anomalies", scored, lambda _s, kv: observe.OPEN_ANOMALIES.record(kv[1].events)
    )
    op.inspect(  # district leak events: waterflow_district_active_anomalies
        "observe_district_anomalies",
        balances,
        lambda _s, kv: observe.OPEN_DISTRICT_ANOMALIES.record(kv[1].events),
    )

    # Written where they are: the sink joins each batch's rows per table (connectors.tier_sink).
    op.output("write_tiers", op.merge("all_rows", *rows_streams), sink)
    return flow


def _district_windows(
    settings: Settings,
) -> Callable[[tuple[str, Windowed]], list[tuple[str, MeterWindows]]]:
    """A district member's 15-minute windows, keyed by its district (nothing for other nodes)."""

    def windows(item: tuple[str, Windowed]) -> list[tuple[str, MeterWindows]]:
        node_id, w = item
        keyed = district_windows(settings.network, node_id, w.windows.kpi_15m)
        return [keyed] if keyed is not None else []

    return windows


def _balance_rows(out: BalanceOutput) -> list[TableRows]:
    rows = [out.rows] if out.rows is not None else []
    return rows + ([events_rows(out.events)] if out.events else [])


def _district_forecaster(settings: Settings) -> Callable[[ClosedDay], DistrictForecaster]:
    def make(day: ClosedDay) -> DistrictForecaster:
        district = _district_of(settings, day.series_id)
        meters = district_meters(settings.network, district)
        return DistrictForecaster(district, settings.tz, meters, settings.holidays)

    return make


def _district_of(settings: Settings, node_id: str) -> str:
    spec = settings.network.nodes[node_id]
    assert spec.district is not None  # only nodes with a district are keyed here
    return spec.district


def _window_rows(run_id: str) -> Callable[[Windowed], list[TableRows]]:
    def rows(w: Windowed) -> list[TableRows]:
        out = [r for r in (w.windows.kpi_15m, w.windows.kpi_daily) if r is not None]
        if w.batch is not None and len(w.batch):
            out.insert(0, readings_rows(w.batch, run_id))
        return out

    return rows


def build_from_env() -> Dataflow:
    """The pipeline from Kafka, configured by the environment (``dataflows.live``).

    For ``python -m bytewax.run "dataflows.pipeline:build_from_env()"``.
    """
    from dataflows import live

    return live.build_from_env()
