"""Bytewax source over CSV files: one partition per file, one ``ParsedChunk`` per step.

Unit of parallelism: the file (workers share the files between them). Delivery: the
partition's snapshot is the number of chunks already emitted, so a resumed run skips them
and re-reads from the next one: at-least-once per chunk, made exactly-once downstream by the
idempotent sinks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.formats import read_path
from dataflows.model import ParsedChunk
from dataflows.settings import Settings


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a replay stands, for the progress line."""

    source: str
    chunks: int
    readings: int
    lines_done: int
    lines_total: int
    elapsed_s: float


def print_progress(p: Progress) -> None:
    """One progress line on stderr, rewritten in place on a terminal."""
    share = p.lines_done / p.lines_total if p.lines_total else 1.0
    rate = p.readings / p.elapsed_s if p.elapsed_s > 0 else 0.0
    line = (
        f"  {p.source}: {share:6.1%} of {p.lines_total:,} lines, "
        f"{p.readings:,} readings, {rate:,.0f} readings/s"
    )
    end = "\r" if sys.stderr.isatty() and share < 1.0 else "\n"
    print(line, end=end, file=sys.stderr, flush=True)


class _FilePartition(StatefulSourcePartition[ParsedChunk, int]):
    def __init__(
        self,
        path: Path,
        settings: Settings,
        fmt: str,
        skip_chunks: int,
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self._path = path
        self._chunks: Iterator[ParsedChunk] = read_path(path, settings, fmt)
        self._emitted = 0
        self._readings = 0
        self._chunk_rows = settings.chunk_rows
        self._total_lines = _count_lines(path) if progress else 0
        self._started = time.monotonic()
        self._progress = progress
        self._last_report = self._started  # the first line comes after a second, or at the end
        # Resuming: the skipped chunks were emitted before the snapshot, so they are re-read
        # (the readers keep cross-chunk state such as the DST fold) but not emitted again.
        for _ in range(skip_chunks):
            if next(self._chunks, None) is None:
                break
            self._emitted += 1

    def next_batch(self) -> list[ParsedChunk]:
        chunk = next(self._chunks, None)
        if chunk is None:
            self._report(done=True)
            raise StopIteration()
        self._emitted += 1
        self._readings += chunk.readings_in
        self._report(done=False)
        return [chunk]

    def _report(self, done: bool) -> None:
        now = time.monotonic()
        if self._progress is None or (not done and now - self._last_report < 1.0):
            return
        self._last_report = now
        lines_done = self._total_lines if done else self._emitted * self._chunk_rows
        self._progress(
            Progress(
                source=self._path.name,
                chunks=self._emitted,
                readings=self._readings,
                lines_done=min(lines_done, self._total_lines),
                lines_total=self._total_lines,
                elapsed_s=now - self._started,
            )
        )

    def snapshot(self) -> int:
        return self._emitted


class FileSource(FixedPartitionedSource[ParsedChunk, int]):
    """Reads CSV exports in any format of FORMATS.md (auto-detected per file)."""

    def __init__(
        self,
        paths: list[Path],
        settings: Settings,
        fmt: str = "auto",
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
        names = [p.name for p in paths]
        if len(set(names)) != len(names):
            raise ValueError(
                f"input files must have distinct names (a name is the source): {names}"
            )
        self._paths = {p.name: p for p in paths}
        self._settings = settings
        self._fmt = fmt
        self._progress = progress

    def list_parts(self) -> list[str]:
        return list(self._paths)

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _FilePartition:
        part = _FilePartition(
            self._paths[for_part], self._settings, self._fmt, resume_state or 0, self._progress
        )
        return part


def _count_lines(path: Path) -> int:
    """Lines in a file, counted in blocks (a fraction of a second for 100 MB)."""
    count = 0
    with path.open("rb") as f:
        while block := f.read(1 << 23):
            count += block.count(b"\n")
    return max(count, 1)


def expand_paths(args: list[str]) -> list[Path]:
    """Files named on the command line; a folder stands for the ``*.csv`` files directly in it."""
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            paths.extend(sorted(q for q in p.glob("*.csv") if q.is_file()))
        else:
            paths.append(p)
    return paths
