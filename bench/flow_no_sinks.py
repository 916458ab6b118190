"""This project's dataflow with no sinks: parse, validate, score, windows and row frames.

``dataflows.pipeline.build_flow`` reads the CSV with ``connectors.file_source.FileSource`` and
writes into a sink that counts the rows of each table and drops them: the dataflow's own cost,
no I/O. Run as a child of bench/compare.py: `python bench/flow_no_sinks.py FILE NETWORK`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main

from connectors.file_source import FileSource
from dataflows.pipeline import build_flow
from dataflows.settings import Settings, replay_chunk_rows
from dataflows.tables import TableRows, concat_by_table
from dataflows.topology import load_network


class CountingSink(DynamicSink[TableRows]):
    """Counts the rows the flow produces per table and drops them."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountingPart:
        return _CountingPart(self.rows)


class _CountingPart(StatelessSinkPartition[TableRows]):
    def __init__(self, rows: dict[str, int]) -> None:
        self._rows = rows

    def write_batch(self, items: list[TableRows]) -> None:
        # Joined per table first, as connectors.tier_sink does before writing: the frames a
        # writer would get are part of the flow's work.
        for rows in concat_by_table(items):
            self._rows[rows.table] = self._rows.get(rows.table, 0) + rows.frame.height


def main() -> int:
    path, network = Path(sys.argv[1]), Path(sys.argv[2])
    topology = load_network(network)
    # The chunk size `waterflow replay` picks for this topology.
    chunks = replay_chunk_rows(len(topology.nodes))
    settings = Settings(run_id="bench", network=topology, chunk_rows=chunks)
    sink = CountingSink()
    t0 = time.perf_counter()
    run_main(build_flow(FileSource([path], settings), sink, settings, snapshots=False))
    seconds = time.perf_counter() - t0
    print(json.dumps({"readings": sink.rows.get("readings", 0),
                      "windows": sink.rows.get("kpi_15m", 0), "work_s": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
