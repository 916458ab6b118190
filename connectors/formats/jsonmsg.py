"""JSON readings (FORMATS.md section 4): Kafka messages, or a JSON-lines file of them.

A value is an object with ``node_id``, ``timestamp`` (ISO-8601, with offset) and any of the
canonical measurement fields. Other fields holding text (tags, units, sequence ids) are
tolerated: the raw text keeps them. A field holding a number that is not a canonical measurement
(``"flow": 3.2``, a misspelt ``"presure"``) is a value nobody would find again: it is
quarantined as ``unknown_measurement`` (the whole reading when it carries no known measurement).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from connectors.formats._common import (
    BAD_TIMESTAMP,
    MISSING_FIELD,
    NON_FINITE,
    OK,
    PARSE_ERROR,
    UNKNOWN_MEASUREMENT,
    LineReader,
    LocalTime,
    Measure,
    assemble,
    iter_chunks,
    node_id_problems,
    parse_times,
    too_long_records,
)
from dataflows.model import MEASUREMENTS, ParsedChunk
from dataflows.settings import QUARANTINE_RAW_BYTES, Settings

_KNOWN_FIELDS = {"node_id", "timestamp", *MEASUREMENTS}
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def _number(v: Any) -> tuple[float, bool, int]:
    """(value, present, reason code) of one JSON field."""
    if v is None:
        return math.nan, False, OK
    if isinstance(v, bool):
        return math.nan, True, PARSE_ERROR
    if isinstance(v, int | float):
        f = float(v)
        return (f, True, OK) if math.isfinite(f) else (math.nan, True, NON_FINITE)
    if isinstance(v, str):
        t = v.strip()
        if not t:
            return math.nan, False, OK
        if t.lower() in _NON_FINITE:
            return math.nan, True, NON_FINITE
        try:
            f = float(t)
        except ValueError:
            return math.nan, True, PARSE_ERROR
        return (f, True, OK) if math.isfinite(f) else (math.nan, True, NON_FINITE)
    return math.nan, True, PARSE_ERROR


def parse_json_values(
    texts: list[str],
    line: np.ndarray,
    source: str,
    local: LocalTime,
    seen: set[str],
    raw_max: int = QUARANTINE_RAW_BYTES,
) -> ParsedChunk:
    """Readings from JSON texts, one reading per text (vectorized after ``json.loads``).

    A quarantine record keeps at most ``raw_max`` bytes of its text.
    """
    n = len(texts)
    reason = np.zeros(n, dtype=np.int8)
    nodes: list[str | None] = [None] * n
    stamps: list[str | None] = [None] * n
    values = np.full((len(MEASUREMENTS), n), np.nan)
    present = np.zeros((len(MEASUREMENTS), n), dtype=bool)
    codes = np.zeros((len(MEASUREMENTS), n), dtype=np.int8)
    cells: list[list[str | None]] = [[None] * n for _ in MEASUREMENTS]
    unknown: dict[str, dict[int, object]] = {}  # numeric fields that are no measurement
    for i, text in enumerate(texts):
        try:
            obj = json.loads(text)
        except ValueError:
            reason[i] = PARSE_ERROR
            continue
        if not isinstance(obj, dict):
            reason[i] = PARSE_ERROR
            continue
        node = obj.get("node_id")
        if isinstance(node, int | float) and not isinstance(node, bool):
            node = str(node)
        if isinstance(node, str):
            nodes[i] = node.strip()
        elif node is not None:
            reason[i] = PARSE_ERROR
            continue
        ts = obj.get("timestamp")
        if ts is None or ts == "":
            stamps[i] = None
        elif isinstance(ts, str):
            stamps[i] = ts
        else:
            stamps[i] = "?"  # not text: an unreadable timestamp
        for j, m in enumerate(MEASUREMENTS):
            if m in obj:
                v, p, c = _number(obj[m])
                values[j, i], present[j, i], codes[j, i] = v, p, c
                if c != OK:
                    cells[j][i] = json.dumps(obj[m]) if not isinstance(obj[m], str) else obj[m]
        for name in obj.keys() - _KNOWN_FIELDS:
            v = obj[name]
            if isinstance(v, int | float) and not isinstance(v, bool):
                unknown.setdefault(name, {})[i] = v
    node_s = pl.Series("node", nodes, dtype=pl.String)
    ts_s = pl.Series("ts", stamps, dtype=pl.String)
    node_code = node_id_problems(node_s)
    fresh = (reason == OK) & (node_code != OK)
    reason[fresh] = node_code[fresh]
    missing_ts = ts_s.is_null().to_numpy()
    reason[(reason == OK) & missing_ts] = MISSING_FIELD
    ts, ts_ok = parse_times(ts_s, local, keys=node_s)
    ts_ok &= reason == OK
    reason[(reason == OK) & ~ts_ok] = BAD_TIMESTAMP
    measures = [
        Measure(m, m, values[j], present[j], codes[j], pl.Series(cells[j], dtype=pl.String))
        for j, m in enumerate(MEASUREMENTS)
        if present[j].any()
    ]
    for name, found in sorted(unknown.items()):
        rows = np.fromiter(found, dtype=np.int64, count=len(found))
        here = np.zeros(n, dtype=bool)
        here[rows] = True
        raw: list[str | None] = [None] * n
        for i, value in found.items():
            raw[i] = json.dumps(value)
        measures.append(
            Measure(None, name, np.full(n, np.nan), here,
                    np.where(here, UNKNOWN_MEASUREMENT, OK).astype(np.int8),
                    pl.Series(raw, dtype=pl.String))
        )  # fmt: skip
    chunk = ParsedChunk(source=source)
    chunk.batches, chunk.quarantined, chunk.nodes = assemble(
        source=source,
        raw=pl.Series("raw", texts, dtype=pl.String),
        line=line,
        node=node_s,
        ts=ts,
        ts_ok=ts_ok,
        reason=reason,
        measures=measures,
        names={},
        seen=seen,
        raw_max=raw_max,
    )
    return chunk


def parse_json_message(
    key: bytes | None, value: bytes, source: str, line: int, settings: Settings
) -> ParsedChunk:
    """One Kafka message as a chunk of at most one reading.

    Args:
        key: the message key (the node id by convention; the value's ``node_id`` is used).
        value: the message value, a JSON object.
        source: where it came from (e.g. ``water.readings/0``), kept on every record.
        line: the message's position (e.g. its offset), kept as the record's ``line``.
        settings: the run's settings (``tz`` for a timestamp without offset).

    Returns:
        A ``ParsedChunk`` with one reading, or one whole-reading quarantine record whose
        reason is ``parse_error`` (not JSON, not an object), ``missing_field`` (no node_id
        or timestamp) or ``bad_timestamp``.

    """
    del key  # the value names its node; a key is only a partitioning hint
    text = value.decode("utf-8", errors="replace")
    return parse_json_values(
        [text], np.array([line], dtype=np.int64), source, LocalTime(settings.tz), set(),
        settings.quarantine_raw_bytes,
    )


def read_json_lines(path: Path, settings: Settings) -> Iterator[ParsedChunk]:
    """Chunks of a JSON-lines file (one message value per line)."""
    source = path.name
    lines = LineReader(path)
    local = LocalTime(settings.tz)
    seen: set[str] = set()
    try:
        raw_max = settings.quarantine_raw_bytes
        for part in iter_chunks(lines, settings.chunk_rows):
            chunk = parse_json_values(part.raw.to_list(), part.line, source, local, seen, raw_max)
            chunk.quarantined.extend(too_long_records(source, part.too_long, raw_max))
            chunk.quarantined.sort(key=lambda q: q.line)
            yield chunk
    finally:
        lines.close()
