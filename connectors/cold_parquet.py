"""Cold tier: a Parquet archive of every accepted reading, loadable into BigQuery.

Layout: ``<root>/readings/date=YYYY-MM-DD/part-<digest>.parquet`` (Hive-style, ``date`` is the
UTC day of ``ts``, like BigQuery's day partitions). Rows in a file are sorted by (node_id, ts),
the clustering of the BigQuery table. Types are BigQuery-loadable: timestamps are microseconds
UTC, ``flags`` is a Parquet LIST of strings (load with list inference).

Unit of parallelism: one writer per Bytewax worker; files are never appended to, so workers
never share a file unless they write the very same rows.

Delivery guarantee: the file name is derived from (sources, first ts, last ts, row count) of
the rows it holds, and a file is written to a temporary name then renamed, so a replayed batch
atomically overwrites its own file: at-least-once delivery, exactly-once effect for the same
batching. A replay that cuts the same readings into different batches writes other files
(duplicates in the archive, removed by the key (node_id, ts) when loading or backfilling).
Only ``readings`` frames are archived; other tables are ignored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import polars as pl
import pyarrow.parquet as pq

from dataflows.tables import KEYS, SCHEMAS, TableRows

TABLE = "readings"
_US_PER_DAY = 86_400_000_000
_EPOCH_DAY = dt.date(1970, 1, 1)


def archive_root(url: str) -> Path:
    """The folder of a ``file://`` URL or a plain path (``bigquery://`` is ``cold_bigquery``'s)."""
    parsed = urlparse(url)
    if parsed.scheme == "bigquery":
        raise ValueError(
            f"cold tier {url!r} is a BigQuery dataset, not a Parquet archive "
            "(connectors.tiers.cold_writer picks the right writer)"
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"cold tier {url!r}: file URLs must be local (file:///path)")
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    raise ValueError(f"cold tier {url!r}: expected file:///path, a folder or bigquery://")


def part_name(frame: pl.DataFrame) -> str:
    """Deterministic file name of a part from (sources, first ts, last ts, row count)."""
    ts = frame["ts"].dt.epoch("us")
    sources = sorted({s for s in frame["source"].unique().to_list() if s is not None})
    ident = "|".join([",".join(sources), str(ts.min()), str(ts.max()), str(frame.height)])
    return f"part-{hashlib.sha256(ident.encode('utf-8')).hexdigest()[:20]}.parquet"


def partition_files(frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Relative path -> rows for a ``readings`` frame: one file per UTC day.

    Rows are deduplicated on (node_id, ts) (last wins) and sorted by (node_id, ts).
    """
    if frame.height == 0:
        return {}
    frame = frame.unique(subset=list(KEYS[TABLE]), keep="last", maintain_order=True)
    day = pl.col("ts").dt.convert_time_zone("UTC").dt.date().alias("_date")
    out: dict[str, pl.DataFrame] = {}
    for (date,), part in frame.with_columns(day).group_by("_date", maintain_order=True):
        rows = part.drop("_date").sort("node_id", "ts")
        out[f"{TABLE}/date={date.isoformat()}/{part_name(rows)}"] = rows
    return dict(sorted(out.items()))


@dataclass
class ColdParquetWriter:
    """Writes each ``readings`` frame as one Parquet file per UTC day under ``root``."""

    root: Path
    name: str = "cold"
    compression: str = "zstd"

    @classmethod
    def from_url(cls, url: str) -> ColdParquetWriter:
        """A writer for a ``file://`` URL or folder (see :func:`archive_root`)."""
        return cls(archive_root(url))

    def write(self, rows: TableRows) -> None:
        """Write (or atomically overwrite) the files of ``rows``; other tables are ignored."""
        if rows.table != TABLE:
            return
        for rel, part in partition_files(rows.frame).items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename: a reader (or a crash) never sees half a file.
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                pq.write_table(
                    part.to_arrow(),
                    tmp,
                    compression=self.compression,
                    coerce_timestamps="us",
                    use_compliant_nested_type=True,
                )
                os.replace(tmp, path)
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(
                    f"cold tier: writing {part.height} readings to {path} failed: {exc}"
                ) from exc

    def close(self) -> None:
        """Nothing to release: every file is complete when ``write`` returns."""


def read_readings(url: str, since_us: int, until_us: int) -> Iterator[pl.DataFrame]:
    """The archived readings of [since, until), one frame per UTC day, sorted by (node_id, ts).

    Frames have the columns and dtypes of ``SCHEMAS['readings']``. Files of a day are read in
    the order they were written, and the key (node_id, ts) is deduplicated keeping the last
    written row: a replay cut into other batches leaves duplicates in the archive, not here.
    """
    root = archive_root(url) / TABLE
    if not root.is_dir():
        raise FileNotFoundError(f"cold tier {url!r}: no archive of readings at {root}")
    # Days since the epoch, so open-ended bounds (far past or future) need no date objects.
    first, last = since_us // _US_PER_DAY, (until_us - 1) // _US_PER_DAY
    columns = list(SCHEMAS[TABLE])
    for folder in sorted(root.glob("date=*")):
        day = (dt.date.fromisoformat(folder.name.removeprefix("date=")) - _EPOCH_DAY).days
        if not first <= day <= last:
            continue
        files = sorted(folder.glob("part-*.parquet"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        if not files:
            continue
        parts = [pl.from_arrow(pq.read_table(f, columns=columns)) for f in files]
        frame = pl.concat(
            [_as_readings(p) for p in parts if isinstance(p, pl.DataFrame)], how="vertical"
        )
        ts = pl.col("ts").dt.epoch("us")
        frame = (
            frame.filter((ts >= since_us) & (ts < until_us))
            .unique(subset=list(KEYS[TABLE]), keep="last", maintain_order=True)
            .sort("node_id", "ts")
        )
        if frame.height:
            yield frame


def _as_readings(frame: pl.DataFrame) -> pl.DataFrame:
    """A frame read back, cast to the readings schema (Parquet may hold null-only columns)."""
    return frame.select([pl.col(name).cast(dtype) for name, dtype in SCHEMAS[TABLE].items()])
