"""Readers of the input formats of shared/FORMATS.md, into canonical per-node batches.

``read_path`` turns one file into ``ParsedChunk`` items of at most ``Settings.chunk_rows``
physical lines each; ``parse_json_message`` does the same for one Kafka message. Whatever a
line holds, it becomes part of a reading or a ``Quarantined`` record with a reason code:
never a crash, never a silent drop. For every chunk, ``readings_in`` counts each reading of
the input once (a line of a long file; a (row, node) with a value in a wide file).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from connectors.formats._common import header_separator, slug
from connectors.formats.canonical import read_canonical
from connectors.formats.hidroconta import NAME_RE as _HIDROCONTA_NAME
from connectors.formats.hidroconta import read_hidroconta
from connectors.formats.jsonmsg import parse_json_message, read_json_lines
from connectors.formats.wide import TIME_HEADER_RE, read_wide
from dataflows.model import ParsedChunk
from dataflows.settings import Settings

FORMATS = ("canonical", "wide", "hidroconta", "json")
_HEAD_BYTES = 64 * 1024

__all__ = ["FORMATS", "detect_format", "parse_json_message", "read_path", "slug"]


def detect_format(path: Path | str, head: bytes) -> str:
    """The format of a file, from its name and its first bytes.

    Args:
        path: the file (only its name is looked at).
        head: the first bytes of the file (a few KB are enough).

    Returns:
        One of ``canonical``, ``wide``, ``hidroconta``, ``json``.

    Raises:
        ValueError: naming the file, when it is empty or matches no known format.

    """
    path = Path(path)
    if _HIDROCONTA_NAME.match(path.name):
        return "hidroconta"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()][:3]
    if not lines:
        raise ValueError(f"{path}: the file is empty, its format cannot be detected")
    first = lines[0]
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson") or first.startswith("{"):
        return "json"
    if any(ln.lower().startswith("data/ora") for ln in lines[:2]):
        return "hidroconta"
    sep = header_separator(first)
    names = [c.strip().strip('"').lower() for c in first.split(sep)]
    if "node_id" in names and "timestamp" in names:
        return "canonical"
    if len(names) >= 2 and TIME_HEADER_RE.match(names[0]):
        return "wide"
    raise ValueError(
        f"{path}: unknown input format (first line {first[:120]!r}); expected a canonical "
        "CSV (node_id,timestamp,...), a wide SCADA report, a Hidroconta export or JSON lines"
    )


def read_path(path: Path, settings: Settings, fmt: str = "auto") -> Iterator[ParsedChunk]:
    """Read one file as chunks of canonical readings.

    Args:
        path: the file.
        settings: the run's settings (``tz`` for local times, ``chunk_rows`` per chunk).
        fmt: ``auto`` (detect from name and content) or one of ``FORMATS``.

    Yields:
        At least one ``ParsedChunk`` (empty for an empty file), each from at most
        ``settings.chunk_rows`` physical lines, with ``source`` the file's name.

    Raises:
        ValueError: for an unknown ``fmt``, or a non-empty file whose format is unknown.

    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} for {path}; expected auto or one of {FORMATS}")
    if fmt == "auto":
        with path.open("rb") as f:
            head = f.read(_HEAD_BYTES)
        if not head.decode("utf-8", errors="replace").lstrip("\ufeff").strip():
            yield ParsedChunk(source=path.name)  # an empty file still shows up in the run
            return
        fmt = detect_format(path, head)
    reader = {
        "canonical": read_canonical,
        "wide": read_wide,
        "hidroconta": read_hidroconta,
        "json": read_json_lines,
    }[fmt]
    emitted = False
    for chunk in reader(path, settings):
        emitted = True
        yield chunk
    if not emitted:
        # A file with a header and no data (or no header) still shows up in the run.
        yield ParsedChunk(source=path.name)
