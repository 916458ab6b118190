"""Cold tier: a Parquet archive of every accepted reading, loadable into BigQuery.

Layout: ``<root>/readings/date=YYYY-MM-DD/part-<seq>-<level>-<tag>.parquet`` (Hive-style,
``date`` is the UTC day of ``ts``, like BigQuery's day partitions). Rows in a file are sorted by
(node_id, ts), the clustering of the BigQuery table. Types are BigQuery-loadable: timestamps are
microseconds UTC, ``flags`` is a Parquet LIST of strings (load with list inference).

Write order: ``seq`` is a zero-padded nanosecond clock, increasing per writer and above every
file already in the day folder, so sorting a day's file names sorts them in write order, and
for a key (node_id, ts) the last written row wins (:func:`read_readings`, compaction). ``level``
0 is one written batch, 1..8 a merge of the newest files of the level below, 9 a whole-day
compaction; a merged file takes the ``seq`` and ``tag`` of the newest file it absorbed, so it
sorts after everything it absorbed and before anything written later. Files named by the old
scheme (``part-<digest>.parquet``) sort before all others, by mtime.

Unit of parallelism: one writer per Bytewax worker. Writers only add files (temporary name,
then rename); merges, which delete the files they absorbed, hold an exclusive ``flock`` on
the ``readings`` folder, so they never overlap, across threads or processes of one host.
Workers hold different nodes, so the clock ordering between writers matters only for the rare
key written by two of them (the one with the later ``seq`` wins).

Delivery guarantee: every write adds new files, so a replay or a resume from a Bytewax
snapshot writes readings the archive may already hold (at-least-once). Compaction makes the
effect exactly-once: it rewrites a day as one file holding each (node_id, ts) once, the last
written row, then deletes the files it absorbed. It runs on ``close()`` for every day this
writer wrote to, and at the first write ``compact_every`` seconds (default 1 h) after the last
one, so once a replay has finished, a live writer has closed, or hourly in a live run, the
archive holds every reading exactly once, and a plain load of ``readings/date=*/*.parquet``
counts each once. Between compactions a day may hold duplicates; :func:`read_readings` removes
them. A crash between writing a merged file and deleting what it absorbed leaves only older
duplicates that the merged file wins over; the next compaction removes them.

Cost: a compaction reads and rewrites its day, once per day touched since the last one (a
replay rewrites what it wrote once more; a live run rewrites today about 24 times a day). So
that a long run never piles up thousands of small files, a write whose day then ends in
``merge_fanout`` (16) files of one level merges them into one file of the next level: each row
is rewritten about log16(writes per day) times (5 for a write every 250 ms), and a day holds at
most about 15 files per level. Only ``readings`` frames are archived; other tables are ignored.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import polars as pl
import pyarrow.parquet as pq

from dataflows.tables import KEYS, SCHEMAS, TableRows, conform

TABLE = "readings"
_US_PER_DAY = 86_400_000_000
_EPOCH_DAY = dt.date(1970, 1, 1)
#: Level of a file holding a whole day (a compaction); lower levels are batches and merges.
WHOLE_DAY = 9
_PART = re.compile(r"part-(\d{20})-(\d)-([0-9a-f]+)\.parquet")
#: Times a day is listed and read again when a file vanished meanwhile (merged by a writer).
_READ_ATTEMPTS = 3


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


def part_name(seq: int, level: int, tag: str) -> str:
    """File name of a part; names of one day sort in write order (see the module docstring)."""
    if not 0 <= level <= WHOLE_DAY:
        raise ValueError(f"cold tier: part level must be 0..{WHOLE_DAY}, got {level}")
    return f"part-{seq:020d}-{level}-{tag}.parquet"


def write_order(path: Path) -> tuple[int, int, str]:
    """Sort key of a day's files, oldest written first (the last written row of a key wins)."""
    if _PART.fullmatch(path.name):
        return (1, 0, path.name)
    # Named before sequence numbers existed: older than any named file, ordered by mtime.
    try:
        return (0, path.stat().st_mtime_ns, path.name)
    except FileNotFoundError:  # merged away since the listing; whoever reads it lists again
        return (0, 0, path.name)


def day_files(folder: Path) -> list[Path]:
    """The Parquet files of a day folder, in write order."""
    return sorted(folder.glob("part-*.parquet"), key=write_order)


def partition_files(frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Day folder (relative to the root) -> rows for a ``readings`` frame: one per UTC day.

    Rows are deduplicated on (node_id, ts) (last wins) and sorted by (node_id, ts).
    """
    if frame.height == 0:
        return {}
    frame = frame.unique(subset=list(KEYS[TABLE]), keep="last", maintain_order=True)
    day = pl.col("ts").dt.convert_time_zone("UTC").dt.date().alias("_date")
    out: dict[str, pl.DataFrame] = {}
    for (date,), part in frame.with_columns(day).group_by("_date", maintain_order=True):
        out[f"{TABLE}/date={date.isoformat()}"] = part.drop("_date").sort("node_id", "ts")
    return dict(sorted(out.items()))


@dataclass
class ColdParquetWriter:
    """Writes each ``readings`` frame as one Parquet file per UTC day under ``root``.

    Compacts the days it wrote to on ``close()`` and every ``compact_every`` seconds, and merges
    the newest ``merge_fanout`` files of a level as they pile up (module docstring).
    """

    root: Path
    name: str = "cold"
    compression: str = "zstd"
    compact_every: float = 3600.0
    merge_fanout: int = 16
    # UTC days written to since their last compaction, and when that was (monotonic s).
    _touched: set[dt.date] = field(default_factory=set, init=False, repr=False)
    _compacted_at: float = field(default_factory=time.monotonic, init=False, repr=False)
    _seq: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.merge_fanout < 2:
            raise ValueError(f"cold tier: merge_fanout must be >= 2, got {self.merge_fanout}")

    @classmethod
    def from_url(cls, url: str) -> ColdParquetWriter:
        """A writer for a ``file://`` URL or folder (see :func:`archive_root`)."""
        return cls(archive_root(url))

    def write(self, rows: TableRows) -> None:
        """Add the files of ``rows`` (one per UTC day); other tables are ignored."""
        if rows.table != TABLE:
            return
        for rel, part in partition_files(rows.frame).items():
            folder = self.root / rel
            day = dt.date.fromisoformat(rel.rpartition("date=")[2])
            folder.mkdir(parents=True, exist_ok=True)
            files = day_files(folder)
            # Above every file of the folder, so a rerun wins even if the clock stepped back.
            newest = max((_seq_of(f) for f in files), default=0)
            self._seq = max(time.time_ns(), self._seq + 1, newest + 1)
            path = folder / part_name(self._seq, 0, uuid.uuid4().hex[:12])
            self._write_file(part, path)
            self._touched.add(day)
            if _merge_run(files + [path], self.merge_fanout):
                self._merge_newest(folder)
        if time.monotonic() - self._compacted_at >= self.compact_every:
            self.compact_touched()

    def compact(self, day: dt.date) -> None:
        """Rewrite a UTC day as one file, each (node_id, ts) once with its last written row.

        The merged file is complete before the files it absorbed are deleted: a crash in between
        leaves older duplicates, which lose to it on read and go at the next compaction.
        """
        folder = self.root / TABLE / f"date={day.isoformat()}"
        with self._lock():
            files = day_files(folder)
            if len(files) > 1:  # one file is deduplicated and sorted already
                self._merge(folder, files, WHOLE_DAY)

    def compact_touched(self) -> None:
        """Compact every day folder written to since the last compaction."""
        for day in sorted(self._touched):
            self.compact(day)
            self._touched.discard(day)
        self._compacted_at = time.monotonic()

    def close(self) -> None:
        """Compact every day holding more than one file: the archive then holds each reading once.

        Not only the days this writer touched: a run resumed from a Bytewax snapshot late in
        its input does not write again the days a killed run left duplicates in.
        """
        root = self.root / TABLE
        for folder in sorted(root.glob("date=*")) if root.is_dir() else []:
            if len(day_files(folder)) > 1:
                self._touched.add(dt.date.fromisoformat(folder.name.removeprefix("date=")))
        self.compact_touched()

    def _merge_newest(self, folder: Path) -> None:
        """Merge the newest files of one level into one of the next, as long as there are enough."""
        with self._lock():
            files = day_files(folder)
            while run := _merge_run(files, self.merge_fanout):
                merged = self._merge(folder, run, _level(run[-1]) + 1)
                files = files[: -len(run)] + [merged]

    def _merge(self, folder: Path, files: list[Path], level: int) -> Path:
        """Replace ``files`` (the newest of the folder, in write order) by one file of ``level``."""
        try:
            rows = _read_files(files)
        except Exception as exc:
            raise RuntimeError(
                f"cold tier: reading {len(files)} files of {folder} to merge them failed: {exc}"
            ) from exc
        frame = rows.unique(subset=list(KEYS[TABLE]), keep="last", maintain_order=True).sort(
            "node_id", "ts"
        )
        newest = _PART.fullmatch(files[-1].name)
        if newest:
            name = part_name(int(newest[1]), level, newest[3])
        else:  # only old-style files: any new sequence number sorts after them
            self._seq = max(time.time_ns(), self._seq + 1)
            name = part_name(self._seq, level, uuid.uuid4().hex[:12])
        target = folder / name
        self._write_file(frame, target)
        try:
            for f in files:
                if f != target:
                    f.unlink(missing_ok=True)
        except OSError as exc:
            raise RuntimeError(
                f"cold tier: merged {len(files)} files of {folder} into {name}, but deleting "
                f"the files it absorbed failed (the next compaction retries): {exc}"
            ) from exc
        return target

    def _write_file(self, frame: pl.DataFrame, path: Path) -> None:
        # Write beside the target and rename: a reader (or a crash) never sees half a file.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(
                frame.to_arrow(),
                tmp,
                compression=self.compression,
                coerce_timestamps="us",
                use_compliant_nested_type=True,
            )
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"cold tier: writing {frame.height} readings to {path} failed: {exc}"
            ) from exc

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive lock of the archive's merges, across the threads and processes of a host."""
        # The folder itself is locked, so the archive holds no lock file for loads to trip on.
        path = self.root / TABLE
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
            yield
        finally:
            os.close(fd)


def _seq_of(path: Path) -> int:
    match = _PART.fullmatch(path.name)
    return int(match[1]) if match else 0


def _level(path: Path) -> int:
    match = _PART.fullmatch(path.name)
    return int(match[2]) if match else WHOLE_DAY  # old-style files: never merged but whole


def _merge_run(files: list[Path], fanout: int) -> list[Path]:
    """The newest files if at least ``fanout`` of them share a level below a whole day, else []."""
    if not files or _level(files[-1]) >= WHOLE_DAY - 1:
        return []
    level = _level(files[-1])
    n = 0
    while n < len(files) and _level(files[-1 - n]) == level:
        n += 1
    return files[-n:] if n >= fanout else []


def _read_files(files: list[Path]) -> pl.DataFrame:
    """The rows of ``files`` concatenated in order, cast to the readings schema."""
    columns = list(SCHEMAS[TABLE])
    parts = [pl.from_arrow(pq.read_table(f, columns=columns)) for f in files]
    return pl.concat(
        [conform(TABLE, p) for p in parts if isinstance(p, pl.DataFrame)], how="vertical"
    )


def read_readings(url: str, since_us: int, until_us: int) -> Iterator[pl.DataFrame]:
    """The archived readings of [since, until), one frame per UTC day, sorted by (node_id, ts).

    Frames have the columns and dtypes of ``SCHEMAS['readings']``. Files of a day are read in
    write order (:func:`write_order`), and the key (node_id, ts) is deduplicated keeping the
    last written row: duplicates a day holds until its next compaction do not show here.
    """
    root = archive_root(url) / TABLE
    if not root.is_dir():
        raise FileNotFoundError(f"cold tier {url!r}: no archive of readings at {root}")
    # Days since the epoch, so open-ended bounds (far past or future) need no date objects.
    first, last = since_us // _US_PER_DAY, (until_us - 1) // _US_PER_DAY
    for folder in sorted(root.glob("date=*")):
        day = (dt.date.fromisoformat(folder.name.removeprefix("date=")) - _EPOCH_DAY).days
        if not first <= day <= last:
            continue
        frame = _read_day(folder)
        if frame is None:
            continue
        ts = pl.col("ts").dt.epoch("us")
        frame = (
            frame.filter((ts >= since_us) & (ts < until_us))
            .unique(subset=list(KEYS[TABLE]), keep="last", maintain_order=True)
            .sort("node_id", "ts")
        )
        if frame.height:
            yield frame


def _read_day(folder: Path) -> pl.DataFrame | None:
    """Every row of a day folder in write order, or None if it holds no file."""
    attempt = 1
    while True:
        files = day_files(folder)
        if not files:
            return None
        try:
            return _read_files(files)
        except FileNotFoundError:
            # A writer merged files between the listing and the read: list the day again.
            if attempt == _READ_ATTEMPTS:
                raise
            attempt += 1

