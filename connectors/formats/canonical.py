"""Canonical long CSV (FORMATS.md section 1): one reading per line, canonical units."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from connectors.formats._common import (
    BAD_TIMESTAMP,
    MISSING_FIELD,
    OK,
    PARSE_ERROR,
    LineReader,
    LocalTime,
    Measure,
    assemble,
    header_separator,
    iter_chunks,
    node_id_problems,
    parse_numbers,
    parse_times,
    split_header,
    split_rows,
    too_long_records,
    whole_records,
)
from dataflows.model import MEASUREMENTS, ParsedChunk
from dataflows.settings import Settings


def read_canonical(path: Path, settings: Settings) -> Iterator[ParsedChunk]:
    """Chunks of a canonical long CSV file."""
    source = path.name
    lines = LineReader(path)
    try:
        head_no, header = lines.take_nonblank()
        if header is None:
            return  # read_path reports the file with an empty chunk
        sep = header_separator(header)
        names = [c.lower() for c in split_header(header, sep)]
        if "node_id" not in names or "timestamp" not in names:
            # Without node and time no line can become a reading; keep every one, header
            # included (it may be data of a headerless file), so nothing is lost.
            yield from _all_missing(source, header, head_no, lines, settings)
            return
        first: dict[str, int] = {}
        for j, name in enumerate(names):
            first.setdefault(name, j)
        columns = [(m, first[m]) for m in MEASUREMENTS if m in first]
        local = LocalTime(settings.tz)
        seen: set[str] = set()
        raw_max = settings.quarantine_raw_bytes
        for part in iter_chunks(lines, settings.chunk_rows):
            chunk = _chunk(source, part.raw, part.line, sep, len(names), first, columns, local,
                           seen, raw_max)
            chunk.quarantined.extend(too_long_records(source, part.too_long, raw_max))
            chunk.quarantined.sort(key=lambda q: q.line)
            yield chunk
    finally:
        lines.close()


def _all_missing(
    source: str, header: str, head_no: int, lines: LineReader, settings: Settings
) -> Iterator[ParsedChunk]:
    raw_max = settings.quarantine_raw_bytes
    chunk = ParsedChunk(source=source)
    chunk.quarantined.extend(
        whole_records(
            source, pl.Series([header]), np.array([head_no]), np.array([True]), "missing_field",
            raw_max,
        )
    )
    for part in iter_chunks(lines, settings.chunk_rows):
        chunk.quarantined.extend(
            whole_records(source, part.raw, part.line, np.ones(len(part.raw), dtype=bool),
                          "missing_field", raw_max)
        )
        chunk.quarantined.extend(too_long_records(source, part.too_long, raw_max))
        chunk.quarantined.sort(key=lambda q: q.line)
        yield chunk
        chunk = ParsedChunk(source=source)
    if chunk.quarantined:
        yield chunk


def _chunk(
    source: str,
    raw: pl.Series,
    line: np.ndarray,
    sep: str,
    ncols: int,
    first: dict[str, int],
    columns: list[tuple[str, int]],
    local: LocalTime,
    seen: set[str],
    raw_max: int,
) -> ParsedChunk:
    if not len(raw):
        return ParsedChunk(source=source)
    cells, ok = split_rows(raw, sep, ncols)
    node = cells[first["node_id"]]
    ts_text = cells[first["timestamp"]]
    reason = np.where(ok, OK, PARSE_ERROR).astype(np.int8)
    node_code = node_id_problems(node)
    reason[(reason == OK) & (node_code != OK)] = node_code[(reason == OK) & (node_code != OK)]
    ts_missing = (ts_text.is_null() | (ts_text.str.len_bytes() == 0)).fill_null(True).to_numpy()
    reason[(reason == OK) & ts_missing] = MISSING_FIELD
    ts, ts_ok = parse_times(ts_text, local, keys=node)
    ts_ok &= reason == OK
    reason[(reason == OK) & ~ts_ok] = BAD_TIMESTAMP
    measures = []
    for m, j in columns:
        values, present, code = parse_numbers(cells[j])
        measures.append(Measure(m, m, values, present, code, cells[j]))
    chunk = ParsedChunk(source=source)
    chunk.batches, chunk.quarantined, chunk.nodes = assemble(
        source=source,
        raw=raw,
        line=line,
        node=node,
        ts=ts,
        ts_ok=ts_ok,
        reason=reason,
        measures=measures,
        names={},
        seen=seen,
        raw_max=raw_max,
    )
    return chunk
