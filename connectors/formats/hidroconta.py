"""Hidroconta telemetry exports (FORMATS.md section 3): one channel of one device per file.

The file name carries the metadata, ``{first}-{last}-{kind}-{site}-{device}-{channel}
{label}.csv``; the content is a quoted description line, a header and ``time;value;unit``
lines in local time with a decimal comma. Each data line is one reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from connectors.formats._common import (
    BAD_TIMESTAMP,
    OK,
    PARSE_ERROR,
    UNIT_UNKNOWN,
    WIDE_MISSING,
    LineReader,
    LocalTime,
    Measure,
    assemble,
    detect_decimal_comma,
    header_separator,
    iter_chunks,
    parse_numbers,
    parse_times,
    slug,
    split_header,
    split_rows,
    too_long_records,
    whole_records,
)
from connectors.formats.wide import norm_unit
from dataflows.model import NodeInfo, ParsedChunk, Quarantined, ReadingBatch
from dataflows.settings import Settings

NAME_RE = re.compile(
    r"^(?P<first>\d{14})-(?P<last>\d{14})-"
    r"(?P<kind>analog|consumption-flow|consumption-hours|consumption|solar)-"
    r"(?P<rest>.+)\.csv$",
    re.IGNORECASE,
)
_REST_RE = re.compile(
    r"^(?P<site>[^-]+)-(?P<device>.+)-(?P<channel>[A-Za-z]+\d+)(?:\s+(?P<label>.*))?$"
)
#: Kinds that are not a network measurement: every line is recorded as skipped.
UNSUPPORTED = ("consumption-hours", "solar")
#: Per kind, the unit (normalised) -> measurement and factor to the canonical unit.
KIND_UNITS: dict[str, dict[str, tuple[str, float]]] = {
    "analog": {
        "bar": ("pressure", 1.0),
        "kpa": ("pressure", 0.01),
        "mca": ("pressure", 0.0980665),
        "m": ("level", 1.0),
    },
    "consumption": {"m3": ("total_flow", 1.0), "l": ("total_flow", 0.001)},
    "consumption-flow": {
        "m3/h": ("flow_rate", 1 / 3.6),
        "l/s": ("flow_rate", 1.0),
        "l/min": ("flow_rate", 1 / 60),
    },
}
#: When the kind is unknown (the file was renamed), the unit alone decides.
ANY_UNITS: dict[str, tuple[str, float]] = {
    **KIND_UNITS["analog"],
    **KIND_UNITS["consumption"],
    **KIND_UNITS["consumption-flow"],
}


def file_meta(name: str) -> dict[str, str] | None:
    """Kind, site, device, channel and label from a Hidroconta file name, or None.

    >>> file_meta("20230611000000-20250618180312-analog-Teatinos-PCR-4-AI00 Entrada.csv")["device"]
    'PCR-4'
    """
    m = NAME_RE.match(name)
    if not m:
        return None
    meta = {"kind": m.group("kind").lower(), "site": "", "device": "", "channel": "", "label": ""}
    rest = m.group("rest").strip()
    r = _REST_RE.match(rest)
    if r:
        meta.update({k: (v or "").strip() for k, v in r.groupdict().items()})
    else:
        meta["label"] = rest
    return meta


def read_hidroconta(path: Path, settings: Settings) -> Iterator[ParsedChunk]:
    """Chunks of a Hidroconta export."""
    source = path.name
    meta = file_meta(source)
    lines = LineReader(path)
    try:
        _, first = lines.take_nonblank()
        if first is None:
            return  # read_path reports the file with an empty chunk
        description = ""
        header: str | None = first
        if not first.lower().startswith("data"):
            description = first.strip().strip('"').strip()
            _, header = lines.take_nonblank()
        if meta is not None:
            label = meta["label"] or meta["channel"]
            name = " ".join(p for p in (meta["site"], meta["device"], label) if p)
            node_id = slug(f"{meta['site']}-{meta['device']}-{label}")
            kind = meta["kind"]
        else:
            name = description or source
            node_id = slug(name)
            kind = ""
        if description:
            name = description
        if header is None:
            return  # read_path reports the file with an empty chunk
        sep = header_separator(header)
        ncols = len(split_header(header, sep))
        decimal_comma = detect_decimal_comma(lines.peek(500), sep) or sep == ";"
        units = KIND_UNITS.get(kind, ANY_UNITS)
        local = LocalTime(settings.tz)
        seen: set[str] = set()
        raw_max = settings.quarantine_raw_bytes
        for part in iter_chunks(lines, settings.chunk_rows):
            chunk = ParsedChunk(source=source)
            raw, line = part.raw, part.line
            if kind in UNSUPPORTED:
                chunk.quarantined = whole_records(
                    source, raw, line, np.ones(len(raw), dtype=bool), "unsupported_channel",
                    raw_max, node_id,
                )  # fmt: skip
            elif len(raw):
                chunk.batches, chunk.quarantined, chunk.nodes = _convert(
                    source, raw, line, sep, ncols, decimal_comma, units, node_id, name, local,
                    seen, raw_max,
                )  # fmt: skip
            chunk.quarantined.extend(too_long_records(source, part.too_long, raw_max))
            chunk.quarantined.sort(key=lambda q: q.line)
            yield chunk
    finally:
        lines.close()


def _convert(
    source: str,
    raw: pl.Series,
    line: np.ndarray,
    sep: str,
    ncols: int,
    decimal_comma: bool,
    units: dict[str, tuple[str, float]],
    node_id: str,
    name: str,
    local: LocalTime,
    seen: set[str],
    raw_max: int,
) -> tuple[list[ReadingBatch], list[Quarantined], list[NodeInfo]]:
    cells, ok = split_rows(raw, sep, max(ncols, 2))
    reason = np.where(ok, OK, PARSE_ERROR).astype(np.int8)
    ts, ts_ok = parse_times(cells[0], local)
    ts_ok &= ok
    reason[(reason == OK) & ~ts_ok] = BAD_TIMESTAMP
    values, present, code = parse_numbers(
        cells[1], decimal_comma=decimal_comma, missing=WIDE_MISSING
    )
    unit_cells = (
        cells[2] if len(cells) > 2 else pl.Series([""] * len(raw), dtype=pl.String)
    ).fill_null("")
    # Few distinct units per file: normalise those in Python, then map every row at once.
    lookup = {u: norm_unit(u) for u in unit_cells.unique().to_list()}
    row_unit = unit_cells.replace_strict(lookup, default="").to_numpy()
    measures: list[Measure] = []
    known = np.zeros(len(raw), dtype=bool)
    by_meas: dict[str, list[tuple[str, float]]] = {}
    for u, (meas, factor) in units.items():
        by_meas.setdefault(meas, []).append((u, factor))
    for meas, pairs in by_meas.items():
        factor_row = np.zeros(len(raw))
        for u, factor in pairs:
            factor_row[row_unit == u] = factor
        mine = factor_row != 0
        known |= mine
        if mine.any():
            measures.append(
                Measure(meas, "Valore", values * factor_row, present & mine, code, cells[1])
            )
    unknown_code = np.where(present, UNIT_UNKNOWN, OK).astype(np.int8)
    measures.append(Measure(None, "Valore", values, present & ~known, unknown_code, cells[1]))
    return assemble(
        source=source,
        raw=raw,
        line=line,
        node=node_id,
        ts=ts,
        ts_ok=ts_ok,
        reason=reason,
        measures=measures,
        names={node_id: name},
        seen=seen,
        raw_max=raw_max,
    )
