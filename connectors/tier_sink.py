"""Bytewax sink that writes every ``TableRows`` to the warm, hot and cold tiers.

Unit of parallelism: one partition per Bytewax worker (``DynamicSink``), each with its own
writers (connections); items are written by whichever worker holds them, so no row crosses
between workers (or processes) to be written. A batch's rows are joined per table first: one
write per table and batch, not one per node's part.

Delivery guarantee: ``write_batch`` returns only once every tier has finished every write, so
what Bytewax snapshots after it is durable (for the hot tier: applied, or in its catch-up
backlog). After a crash Bytewax recovery replays the items since the last snapshot
(at-least-once); every tier writes idempotently, so the effect is exactly-once. A warm or cold
failure raises (after the tier's own retries) and stops the flow. The hot tier is a cache: a
Redis outage does not raise; its writer keeps the batch in a bounded backlog and catches up
when Redis answers (``connectors.hot_redis``), so warm and cold go on.

A replay (no recovery snapshots) may overlap writing with computing: ``TierSink(config,
overlap=True)`` returns from ``write_batch`` as soon as the batch is handed to the tier threads,
with up to ``OVERLAP_BATCHES`` batches in flight; it waits for the oldest one when one more
would exceed that (and for all at ``close``), so the flow computes on while the servers take
the batches before. Four, because a replay's batches come in bursts (a chunk's readings
and KPIs, its balances, then at once its forecasts): with fewer in flight the flow would wait
for the first while it could already compute the next chunk; a bound, so that a flow faster
than a tier does not pile batches up in memory. Each tier still writes its batches in order
(one thread each). A failure then stops the flow a few batches later, still before the run
is marked finished; a tier writes no batch after one it failed, and batches no tier
started are not written. The run's ``ingest_runs`` row waits for every batch before it, so
it never counts a row that was not stored. Never for a flow with recovery: a snapshot could
count a write in flight.

Metrics: a writer counts in ``waterflow_sink_errors`` the failures it absorbs (the hot tier's
outages); this sink counts the ones a writer raises; so each failure counts once.
``waterflow_sink_rows`` counts the rows handed to each tier; for the hot tier those waiting in
its backlog are in ``waterflow_hot_backlog_readings``.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors import metrics
from connectors.tiers import TierConfig, TierWriter, close_all, open_writers
from dataflows.tables import TableRows, concat_by_table

#: Batches ``TierSink(overlap=True)`` may have in flight (see the module docstring).
OVERLAP_BATCHES = 4
#: The run's ledger row (``dataflows.rows.run_rows``): written after the rows it counts.
RUN_TABLE = "ingest_runs"


class _TierPartition(StatelessSinkPartition[TableRows]):
    """Writes a batch to the tiers side by side, each tier (or warm lane) in order on a thread.

    The tiers wait on different servers (PostgreSQL, Redis, disk), and their clients release
    the GIL while they wait, so writing them concurrently takes about as long as the slowest
    one instead of the sum. ``write_batch`` still returns only when every tier is done.
    """

    def __init__(self, writers: list[TierWriter], overlap: bool) -> None:
        self._writers = writers
        self._overlap = overlap
        # One thread per writer (a tier, or a lane of one: see ``tiers.open_writers``).
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tier-{w.name}{i}")
            for i, w in enumerate(writers)
        ]
        #: Per batch in flight, oldest first: its write on each tier.
        self._in_flight: deque[list[Future[None]]] = deque()
        #: Tiers whose write failed: their thread writes no later batch (overlap).
        self._failed: set[str] = set()

    def write_batch(self, items: list[TableRows]) -> None:
        # The run's row counts the rows of the batches before it. With batches in flight, and
        # the warm tier on two connections, it could commit before a row it counts, and stay
        # so if that write then failed: so (once a heartbeat, and at the end of the input) every
        # batch before it and the rest of its own batch are written first.
        runs = [r for r in items if r.table == RUN_TABLE] if self._overlap else []
        if runs:
            items = [r for r in items if r.table != RUN_TABLE]
        # Overlap: the oldest batch done (or its failure raised here) if the one handed over
        # now would exceed the batches in flight allowed.
        self._settle(keep=OVERLAP_BATCHES - 1 if self._overlap and not runs else 0)
        self._submit(items)
        if not self._overlap or runs:
            self._settle()
        if runs:
            self._submit(runs)

    def _submit(self, items: list[TableRows]) -> None:
        writes = concat_by_table(items)
        self._in_flight.append(
            [
                pool.submit(self._write_tier, w, _taken(w, writes))
                for pool, w in zip(self._threads, self._writers, strict=True)
            ]
        )

    def _settle(self, keep: int = 0) -> None:
        """Wait for the oldest batches until at most ``keep`` are in flight; raise a failure."""
        while len(self._in_flight) > keep:
            futures = self._in_flight.popleft()
            wait(futures)
            failed = [f for f in futures if f.exception() is not None]
            if failed:
                # Later batches not started yet are not written; running ones finish (close),
                # and a tier that failed writes none after its failure.
                for later in self._in_flight:
                    for future in later:
                        future.cancel()
                self._in_flight.clear()
                failed[0].result()  # the first failure, now that no tier writes this batch

    def _write_tier(self, writer: TierWriter, items: list[TableRows]) -> None:
        """One tier's writes of a batch, on its thread; none after a failed batch of the tier."""
        if writer.name in self._failed:
            raise RuntimeError(f"{writer.name} tier: batch not written, an earlier one failed")
        try:
            _write_all(writer, items)
        except BaseException:
            self._failed.add(writer.name)
            raise

    def close(self) -> None:
        try:
            self._settle()
        finally:
            for pool in self._threads:
                pool.shutdown(wait=True)
            close_all(self._writers)


def _taken(writer: TierWriter, items: list[TableRows]) -> list[TableRows]:
    """The items a writer takes: all, or those of its ``tables`` (a warm lane)."""
    tables: frozenset[str] | None = getattr(writer, "tables", None)
    return items if tables is None else [rows for rows in items if rows.table in tables]


def _write_all(writer: TierWriter, items: list[TableRows]) -> None:
    for rows in items:
        started = time.perf_counter()
        try:
            writer.write(rows)
        except Exception:
            metrics.SINK_ERRORS.labels(writer.name).inc()
            raise
        metrics.SINK_WRITE_SECONDS.labels(writer.name).observe(time.perf_counter() - started)
        metrics.SINK_ROWS.labels(writer.name, rows.table).inc(rows.frame.height)


class TierSink(DynamicSink[TableRows]):
    """Writes each ``TableRows`` to every tier of ``config``.

    Pass a config from :func:`connectors.tiers.resolve_embedded` so all workers share the same
    embedded servers; an unresolved one is resolved in each worker (same result, more work).
    """

    def __init__(self, config: TierConfig, overlap: bool = False) -> None:
        self.config = config
        self.overlap = overlap  # see the module docstring: replays without recovery only

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TierPartition:
        """Connect this worker's writers."""
        # A replay writes the large warm tables on a second connection (a lane, see
        # ``tiers.WARM_SIDE_TABLES``), beside the others; a live flow keeps one per worker.
        lanes = 2 if self.overlap else 1
        return _TierPartition(open_writers(self.config, warm_lanes=lanes), self.overlap)
