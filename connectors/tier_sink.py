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
overlap=True)`` returns from ``write_batch`` as soon as the batch is handed to the tier threads
and waits for it at the next batch (or at ``close``), so the flow computes the next batch while
the servers take this one. A failure then stops the flow one batch later, still before the run
is marked finished. Never for a flow with recovery: a snapshot could count a write in flight.

Metrics: a writer counts in ``waterflow_sink_errors`` the failures it absorbs (the hot tier's
outages); this sink counts the ones a writer raises; so each failure counts once.
``waterflow_sink_rows`` counts the rows handed to each tier; for the hot tier those waiting in
its backlog are in ``waterflow_hot_backlog_readings``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors import metrics
from connectors.tiers import TierConfig, TierWriter, close_all, open_writers
from dataflows.tables import TableRows, concat_by_table


class _TierPartition(StatelessSinkPartition[TableRows]):
    """Writes a batch to the tiers side by side, each tier in order on a thread of its own.

    The tiers wait on different servers (PostgreSQL, Redis, disk), and their clients release
    the GIL while they wait, so writing them concurrently takes about as long as the slowest
    one instead of the sum. ``write_batch`` still returns only when every tier is done.
    """

    def __init__(self, writers: list[TierWriter], overlap: bool) -> None:
        self._writers = writers
        self._overlap = overlap
        self._threads = {
            w.name: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tier-{w.name}")
            for w in writers
        }
        self._in_flight: list[Future[None]] = []

    def write_batch(self, items: list[TableRows]) -> None:
        self._settle()  # the batch before (overlap): done, or its failure raised here
        writes = concat_by_table(items)
        self._in_flight = [
            self._threads[w.name].submit(_write_all, w, writes) for w in self._writers
        ]
        if not self._overlap:
            self._settle()

    def _settle(self) -> None:
        futures, self._in_flight = self._in_flight, []
        wait(futures)
        for future in futures:
            future.result()  # the first failure, now that no tier is still writing

    def close(self) -> None:
        try:
            self._settle()
        finally:
            for pool in self._threads.values():
                pool.shutdown(wait=True)
            close_all(self._writers)


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
        return _TierPartition(open_writers(self.config), self.overlap)
