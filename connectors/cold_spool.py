"""Cold tier for a live flow: readings spooled to local Parquet files, loaded into BigQuery in bulk.

Why: BigQuery allows 1,500 load jobs per table and day. The batch writer
(``connectors.cold_bigquery``) runs two jobs per batch (load into staging, MERGE), which suits a
replay's large batches, but a live flow writes a batch every fraction of a second and would run
out of quota within hours. Here ``write`` only appends the batch to a spool folder on local
disk, and a background thread hands everything spooled to the batch writer every
``load_every_s`` seconds (default 15 min): two jobs per period whatever the input rate, 192 a
day, for months. The Storage Write API with committed streams would also hold the quota, but its
exactly-once needs the stream offsets kept in step with Bytewax's snapshots, and one stream per
worker for ever; the spool needs neither, reuses the MERGE that makes replays idempotent, and
puts the cold tier at most one period behind (hot and warm are the real-time tiers).

Delivery guarantee: ``write`` returns once the batch is in a spool file (written to a temporary
name, fsync'd, renamed), so what Bytewax snapshots after it survives a crash of the process.
Spool files are deleted only after the load and MERGE that hold them succeeded; a crash or a
failure in between leaves them to the next load (after a restart too), and the MERGE on
(node_id, ts) makes loading them twice harmless: exactly-once in effect. A failed load is
logged and counted (``waterflow_sink_errors{tier="cold"}``) and retried at the next period;
the flow goes on. ``close`` loads what is left and raises if that fails (the files stay).

Unit of parallelism: one spool per writer; writers may share a folder (each file is loaded by
whichever writer lists it first; a file loaded twice is merged twice, harmlessly).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from connectors import metrics
from connectors.cold_bigquery import ColdBigQueryWriter
from dataflows.tables import TableRows, conform

log = logging.getLogger(__name__)
#: Context of this module's log records (dataflows.logs shows it as fields).
LOG_CONTEXT = {"step": "write_tiers", "tier": "cold"}

TABLE = "readings"
#: Readings loaded by one job at most; a larger backlog (after an outage) takes several.
MAX_LOAD_ROWS = 2_000_000


@dataclass
class SpooledBigQueryWriter:
    """``readings`` spooled under ``spool_dir``, loaded by ``inner`` every ``load_every_s``."""

    inner: ColdBigQueryWriter
    spool_dir: Path
    load_every_s: float = 900.0
    name: str = "cold"
    loads: int = 0  # load + MERGE rounds done, for tests and logs
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def connect(self) -> None:
        """Connect the batch writer (creates the table), start the periodic loads."""
        if not self.load_every_s > 0:
            raise ValueError(f"load_every_s must be > 0, got {self.load_every_s}")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.inner.connect()
        self._thread = threading.Thread(target=self._loop, name="cold-spool", daemon=True)
        self._thread.start()

    def write(self, rows: TableRows) -> None:
        """Append the ``readings`` rows to the spool (durable on return); other tables ignored."""
        if rows.table != TABLE or rows.frame.height == 0:
            return
        # Names sort by time of writing, so a load merges older spool files first.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.spool_dir / f".{name}.tmp"
        try:
            pq.write_table(rows.frame.to_arrow(), tmp, compression="zstd",
                           coerce_timestamps="us", use_compliant_nested_type=True)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.spool_dir / name)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"cold tier: spooling {rows.frame.height} readings to {self.spool_dir} failed: "
                f"{exc}"
            ) from exc

    def pending(self) -> list[Path]:
        """Spool files not loaded yet, oldest first."""
        return sorted(self.spool_dir.glob("*.parquet"))

    def load_pending(self) -> int:
        """Load every spooled file into BigQuery now; the readings loaded."""
        with self._lock:  # the periodic thread and close() never load the same files at once
            loaded = 0
            files = self.pending()
            while files:
                group: list[Path] = []
                rows = 0
                while files and (not group or rows < MAX_LOAD_ROWS):
                    group.append(files.pop(0))
                    rows += pq.read_metadata(group[-1]).num_rows
                frame = pl.concat([_read(f) for f in group], how="vertical")
                self.inner.write(TableRows(TABLE, frame))  # dedups: the newest file wins
                for f in group:
                    f.unlink(missing_ok=True)  # another writer on the folder may have loaded it
                self.loads += 1
                loaded += frame.height
            return loaded

    def _loop(self) -> None:
        while not self._stop.wait(self.load_every_s):
            try:
                self.load_pending()
            except Exception:  # kept on disk, tried again next period
                metrics.SINK_ERRORS.labels(self.name).inc()
                log.exception("cold tier: loading the spool %s into BigQuery failed; "
                              "retrying in %g s", self.spool_dir, self.load_every_s,
                              extra=LOG_CONTEXT)

    def close(self) -> None:
        """Stop the periodic loads, load what is left, close the batch writer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.load_pending()
        finally:
            self.inner.close()


def _read(path: Path) -> pl.DataFrame:
    frame = pl.from_arrow(pq.read_table(path))
    assert isinstance(frame, pl.DataFrame)
    return conform(TABLE, frame)
