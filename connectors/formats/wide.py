"""Wide SCADA reports (FORMATS.md section 2): one column per node and measurement.

Each (row, node) with at least one non-missing cell is one reading. Values are converted to
canonical units per column; a cell that cannot be read is quarantined alone (the node's
other values of the row are kept), and a node whose every present cell of a row is bad is
quarantined whole for that row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from connectors.formats._common import (
    BAD_TIMESTAMP,
    OK,
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
from dataflows.model import ParsedChunk
from dataflows.settings import Settings

#: A first header cell that names the time column(s).
TIME_HEADER_RE = re.compile(r"^(data|date|time|timestamp|giorno|ora|ts|datetime|tempo)\b")
_DATE_ONLY_RE = re.compile(r"^(data|date|giorno|day)$")
_CLOCK_RE = re.compile(r"^(ora|orario|time|hour|hh:mm(:ss)?)$")

#: Units as written in reports (normalised: lower case, no spaces) -> measurement, factor
#: to the canonical unit.
UNITS: dict[str, tuple[str, float]] = {
    "l/s": ("flow_rate", 1.0),
    "lps": ("flow_rate", 1.0),
    "l/sec": ("flow_rate", 1.0),
    "m3/h": ("flow_rate", 1 / 3.6),
    "mc/h": ("flow_rate", 1 / 3.6),
    "m3/hr": ("flow_rate", 1 / 3.6),
    "l/min": ("flow_rate", 1 / 60),
    "lpm": ("flow_rate", 1 / 60),
    "m3/s": ("flow_rate", 1000.0),
    "bar": ("pressure", 1.0),
    "kpa": ("pressure", 0.01),
    "mca": ("pressure", 0.0980665),
    "m.c.a.": ("pressure", 0.0980665),
    "mh2o": ("pressure", 0.0980665),
    "°c": ("temperature", 1.0),
    "degc": ("temperature", 1.0),
    "c": ("temperature", 1.0),
    "m3": ("total_flow", 1.0),
    "mc": ("total_flow", 1.0),
    "m": ("level", 1.0),
    "mg/l": ("chlorine", 1.0),
    "ph": ("ph", 1.0),
    "ntu": ("turbidity", 1.0),
    "us/cm": ("conductivity", 1.0),
    "mv": ("redox", 1.0),
}
#: Measurement words, most specific first ("TOTALIZZATORE PORTATA" is a volume).
WORDS: tuple[tuple[str, str], ...] = (
    ("TOTALIZZATORE", "total_flow"),
    ("TOTALIZER", "total_flow"),
    ("VOLUME", "total_flow"),
    ("LIVELLO", "level"),
    ("LEVEL", "level"),
    ("PRESSIONE", "pressure"),
    ("PRESSURE", "pressure"),
    ("TEMPERATURA", "temperature"),
    ("TEMPERATURE", "temperature"),
    ("CLORO", "chlorine"),
    ("CHLORINE", "chlorine"),
    ("TORBIDITA", "turbidity"),
    ("TURBIDITY", "turbidity"),
    ("CONDUCIBILITA", "conductivity"),
    ("CONDUCTIVITY", "conductivity"),
    ("REDOX", "redox"),
    ("PH", "ph"),
    ("PORTATA", "flow_rate"),
    ("FLOW", "flow_rate"),
)


def norm_unit(unit: str) -> str:
    """A unit in the lookup form of ``UNITS`` (lower case, no spaces, plain digits)."""
    u = unit.strip().lower().replace(" ", "").replace("³", "3").replace("µ", "u")
    u = u.replace("μ", "u")
    # A degree sign mangled by a non-UTF-8 export is still a temperature.
    if u in ("\ufffdc", "ºc"):
        return "°c"
    return u


@dataclass(frozen=True, slots=True)
class Column:
    """How one data column of a report maps to a node and a canonical measurement."""

    index: int
    header: str
    node_id: str
    node_name: str
    measurement: str | None  # None: unit unknown and no measurement word
    factor: float


def _split_name(header: str) -> tuple[str, str, str]:
    """Node name, qualifier and unit in parentheses from a column header."""
    name, qual = header, ""
    if " - " in header:
        name, qual = (p.strip() for p in header.split(" - ", 1))
    unit = ""
    target = qual if qual else name
    m = re.search(r"\(([^()]*)\)\s*$", target)
    if m and norm_unit(m.group(1)) in UNITS:
        unit = m.group(1)
        target = target[: m.start()].strip()
        if qual:
            qual = target
        else:
            name = target
    return name.strip(), qual, unit


def _measurement(text: str, unit: str) -> tuple[str | None, float]:
    u = norm_unit(unit)
    word = None
    upper = text.upper()
    for w, meas in WORDS:
        if re.search(rf"\b{w}\b", upper):
            word = meas
            break
    if word is None:
        if u in UNITS:
            return UNITS[u]
        return None, 1.0
    if not u:
        return word, 1.0
    if u in UNITS and UNITS[u][0] == word:
        return word, UNITS[u][1]
    if word == "pressure" and u in ("m", "mwc"):
        return word, 0.0980665  # metres of water column
    return None, 1.0


def map_columns(headers: list[str], units: list[str], first_data: int) -> list[Column]:
    """Map data columns to nodes and measurements (FORMATS.md section 2).

    A node with two columns of the same measurement gets, for the second column, the id
    ``slug(node + " " + qualifier)`` so no value is lost or overwritten.
    """
    columns: list[Column] = []
    taken: dict[str, set[str]] = {}
    for j in range(first_data, len(headers)):
        header = headers[j] or f"column {j + 1}"
        name, qual, paren_unit = _split_name(header)
        unit = units[j] if j < len(units) and units[j] else paren_unit
        meas, factor = _measurement(qual if qual else header, unit)
        node_name = name or header
        node_id = slug(node_name)
        if meas is not None and meas in taken.get(node_id, set()):
            node_name = f"{name} {qual}".strip() if qual else f"{header} {j + 1}"
            node_id = slug(node_name)
            if meas in taken.get(node_id, set()):
                node_name = f"{node_name} {j + 1}"
                node_id = slug(node_name)
        if meas is not None:
            taken.setdefault(node_id, set()).add(meas)
        columns.append(Column(j, header, node_id, node_name, meas, factor))
    return columns


def read_wide(path: Path, settings: Settings) -> Iterator[ParsedChunk]:
    """Chunks of a wide SCADA report."""
    source = path.name
    lines = LineReader(path)
    try:
        _, header = lines.take_nonblank()
        if header is None:
            return  # read_path reports the file with an empty chunk
        sep = header_separator(header)
        headers = split_header(header, sep)
        lower = [h.lower() for h in headers]
        two = (
            len(headers) > 2 and bool(_DATE_ONLY_RE.match(lower[0]))
            and bool(_CLOCK_RE.match(lower[1]))
        )  # fmt: skip
        first_data = 2 if two else 1
        units: list[str] = []
        nxt = lines.peek(1)
        if nxt and nxt[0].strip():
            cand = split_header(nxt[0], sep)
            if all(not c for c in cand[:first_data]) and any(cand[first_data:]):
                units = cand
                lines.take(1)
        decimal_comma = detect_decimal_comma(lines.peek(500), sep)
        columns = map_columns(headers, units, first_data)
        groups: dict[str, list[Column]] = {}
        for c in columns:
            groups.setdefault(c.node_id, []).append(c)
        names = {c.node_id: c.node_name for c in columns}
        local = LocalTime(settings.tz)
        seen: set[str] = set()
        raw_max = settings.quarantine_raw_bytes
        for part in iter_chunks(lines, settings.chunk_rows):
            chunk = _chunk(
                source, part.raw, part.line, sep, len(headers), two, decimal_comma, groups,
                names, local, seen, raw_max,
            )  # fmt: skip
            chunk.quarantined.extend(too_long_records(source, part.too_long, raw_max))
            chunk.quarantined.sort(key=lambda q: q.line)
            yield chunk
    finally:
        lines.close()


def _chunk(
    source: str,
    raw: pl.Series,
    line: np.ndarray,
    sep: str,
    ncols: int,
    two: bool,
    decimal_comma: bool,
    groups: dict[str, list[Column]],
    names: dict[str, str],
    local: LocalTime,
    seen: set[str],
    raw_max: int,
) -> ParsedChunk:
    chunk = ParsedChunk(source=source)
    if not len(raw):
        return chunk
    cells, ok = split_rows(raw, sep, ncols)
    # A line that cannot be split is one unreadable record: its nodes cannot be told apart.
    chunk.quarantined.extend(whole_records(source, raw, line, ~ok, "parse_error", raw_max))
    if two:
        ts_text = pl.select(pl.concat_str([cells[0], cells[1]], separator=" ")).to_series()
    else:
        ts_text = cells[0]
    ts, ts_ok = parse_times(ts_text, local)
    parsed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for cols in groups.values():
        for c in cols:
            values, present, code = parse_numbers(
                cells[c.index], decimal_comma=decimal_comma, missing=WIDE_MISSING
            )
            present &= ok
            if c.measurement is None:
                code[present] = UNIT_UNKNOWN
            elif c.factor != 1.0:
                values = values * c.factor
            parsed[c.index] = (values, present, code)
    for node_id, cols in groups.items():
        present_any = np.zeros(len(raw), dtype=bool)
        for c in cols:
            present_any |= parsed[c.index][1]
        sel = np.flatnonzero(present_any)
        if sel.size == 0:
            continue
        measures = []
        for c in cols:
            values, present, code = parsed[c.index]
            measures.append(
                Measure(
                    c.measurement, c.header, values[sel], present[sel], code[sel],
                    cells[c.index].gather(sel),
                )
            )  # fmt: skip
        sub_ok = ts_ok[sel]
        batches, quarantined, nodes = assemble(
            source=source,
            raw=raw.gather(sel),
            line=line[sel],
            node=node_id,
            ts=ts[sel],
            ts_ok=sub_ok,
            reason=np.where(sub_ok, OK, BAD_TIMESTAMP).astype(np.int8),
            measures=measures,
            names=names,
            seen=seen,
            raw_max=raw_max,
        )
        chunk.batches.extend(batches)
        chunk.quarantined.extend(quarantined)
        chunk.nodes.extend(nodes)
    chunk.quarantined.sort(key=lambda q: q.line)
    return chunk
