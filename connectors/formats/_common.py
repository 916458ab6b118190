"""Building blocks shared by the readers: lines, splitting, numbers, times, batches.

Everything on the happy path is vectorized (polars/numpy) over a chunk of lines; Python
loops run only over the rejected cells and lines, which are rare in real exports.
"""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

from dataflows.model import (
    COL,
    US_PER_DAY,
    US_PER_HOUR,
    US_PER_MIN,
    US_PER_S,
    NodeInfo,
    Quarantined,
    ReadingBatch,
    empty_values,
)

# Reason codes, as small ints so they can live in numpy arrays; 0 means "no problem".
OK = 0
PARSE_ERROR = 1
MISSING_FIELD = 2
BAD_TIMESTAMP = 3
NON_FINITE = 4
UNIT_UNKNOWN = 5
UNSUPPORTED_CHANNEL = 6
UNKNOWN_MEASUREMENT = 7
REASONS = (
    "",
    "parse_error",
    "missing_field",
    "bad_timestamp",
    "non_finite",
    "unit_unknown",
    "unsupported_channel",
    "unknown_measurement",
)

MAX_NODE_ID = 200
# Read this many bytes at a time, so a multi-GB file never sits in memory at once.
BLOCK_BYTES = 32 << 20
#: A line longer than this is no export's row (a wide report of 5 000 columns is ~60 KB): it is
#: quarantined unread, and only its first bytes are held while the rest is skipped.
MAX_LINE_BYTES = 1 << 20
BOM = "\ufeff"


# --------------------------------------------------------------------------------------
# Node ids


def slug(name: str) -> str:
    """A stable node id from a display name.

    Letters are folded to ASCII (NFKD, accents dropped), lower-cased; every run of other
    characters becomes one ``-``; leading and trailing ``-`` are stripped. A name with no
    letter or digit at all still gets a stable, non-empty id derived from its hash.

    >>> slug("SELARGIUS (NODO VIA SANT ANNA)")
    'selargius-nodo-via-sant-anna'
    >>> slug("Teatinos-PCR-4-Entrada")
    'teatinos-pcr-4-entrada'
    >>> slug("Cañada Niño")
    'canada-nino'
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    out = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    if out:
        return out
    # Two distinct unreadable names must not merge into one node.
    digest = hashlib.sha1(name.encode("utf-8", "replace"), usedforsecurity=False).hexdigest()
    return "node-" + digest[:10]


# --------------------------------------------------------------------------------------
# Lines


def clip_raw(text: str, limit: int, size: int | None = None) -> str:
    """At most ``limit`` bytes (UTF-8) of a rejected record's text, saying what was cut.

    ``size`` is the record's full size in bytes when ``text`` is already a prefix of it (a
    line cut while it was read).

    >>> clip_raw("abc", 64)
    'abc'
    >>> clip_raw("é" * 40, 64)  # 80 bytes; a character is never split
    'éééééééééééééééééééééééééééééééé... [cut: 16 bytes]'
    """
    if size is None and len(text) * 4 <= limit:
        return text  # cannot be over the limit: no encoding needed
    data = text.encode("utf-8", "replace")
    size = len(data) if size is None else size
    if size <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}... [cut: {size - len(kept.encode('utf-8'))} bytes]"


class LineReader:
    r"""Physical lines of a file, decoded leniently, read block by block.

    Bytes are decoded as UTF-8 with ``errors="replace"`` (a bad byte never stops a file), a
    leading byte-order mark is dropped and CRLF or CR line ends become plain line ends.
    Blocks are cut at a ``\n`` byte, which never falls inside a multi-byte UTF-8 character.
    """

    def __init__(
        self, path: Path, block_bytes: int = BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
    ) -> None:
        self._f: BinaryIO = path.open("rb")
        self._block = block_bytes
        self._max_line = max_line_bytes
        self._buf: list[str] = []
        self._pos = 0
        self._carry = b""
        self._carry_skipped = 0  # bytes of the unfinished line dropped past the limit
        self._first = True
        self._eof = False
        self.next_line = 1  # physical number of the next line ``take`` returns
        #: Lines over ``max_line_bytes`` by number: their size in bytes. Their text in the
        #: buffer is only their first ``max_line_bytes`` (see :meth:`pop_too_long`).
        self.too_long: dict[int, int] = {}

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def _decode(self, data: bytes) -> list[str]:
        if self._first:
            self._first = False
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
        text = data.decode("utf-8", errors="replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text.split("\n")

    def _fill(self, n: int) -> None:
        while len(self._buf) - self._pos < n and not self._eof:
            block = self._f.read(self._block)
            if not block:
                self._eof = True
                if self._carry or self._carry_skipped:
                    self._add(self._carry)
                    self._carry = b""
                break
            if self._carry_skipped:
                # Inside a line already over the limit: its bytes up to the next line end are
                # counted, never kept or decoded, so a 50 MB line costs a block of memory.
                end = block.find(b"\n")
                if end < 0:
                    self._carry_skipped += len(block)
                    continue
                self._carry_skipped += end - (end > 0 and block[end - 1] == 0x0D)  # CRLF
                self._add(self._carry)
                self._carry, block = b"", block[end + 1 :]
            data = self._carry + block if self._carry else block
            cut = data.rfind(b"\n")
            if cut >= 0:
                # The CR of a CRLF before the cut is part of the line end, not a line of its own.
                self._add(data[: cut - 1] if data[cut - 1 : cut] == b"\r" else data[:cut])
            self._carry = data[cut + 1 :] if cut >= 0 else data
            if len(self._carry) > self._max_line:
                self._carry_skipped = len(self._carry) - self._max_line
                self._carry = self._carry[: self._max_line]

    def _add(self, data: bytes) -> None:
        """Decode complete lines into the buffer, cutting those over the limit."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        first_no = self.next_line + len(self._buf)
        lines = self._decode(data)
        skipped, self._carry_skipped = self._carry_skipped, 0
        # A character takes at most 4 bytes: lines shorter than a quarter of the limit need
        # no encoding to know they are within it (the usual case: no loop at all).
        quarter = self._max_line // 4
        if skipped or (len(data) > self._max_line and max(map(len, lines)) > quarter):
            for i, text in enumerate(lines):
                if len(text) <= quarter and not (i == 0 and skipped):
                    continue
                size = len(text.encode("utf-8")) + (skipped if i == 0 else 0)
                if size > self._max_line:
                    self.too_long[first_no + i] = size
                    lines[i] = text[: self._max_line]
        self._buf.extend(lines)

    def peek(self, n: int) -> list[str]:
        """The next ``n`` lines (fewer at the end), without consuming them."""
        self._fill(n)
        return self._buf[self._pos : self._pos + n]

    def take(self, n: int) -> tuple[int, list[str]]:
        """The next ``n`` lines (fewer at the end) and the number of the first one."""
        self._fill(n)
        start = self.next_line
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        self.next_line += len(out)
        return start, out

    def take_nonblank(self) -> tuple[int, str | None]:
        """The next line that is not blank, skipping blank ones; None at the end of file."""
        while True:
            no, got = self.take(1)
            if not got:
                return no, None
            if got[0].strip():
                return no, got[0]


@dataclass(slots=True)
class Lines:
    """A chunk of a file: its non-blank lines and their numbers, and the lines too long to read.

    ``too_long`` holds each overlong line as (number, first bytes as text, size in bytes);
    such a line is in none of the other fields (see :func:`too_long_records`).
    """

    raw: pl.Series
    line: np.ndarray
    too_long: list[tuple[int, str, int]]


def iter_chunks(lines: LineReader, chunk_rows: int) -> Iterator[Lines]:
    """Chunks of at most ``chunk_rows`` physical lines, blank ones left out."""
    while True:
        start, chunk = lines.take(chunk_rows)
        if not chunk:
            return
        raw = pl.Series("raw", chunk, dtype=pl.String)
        line = np.arange(start, start + len(chunk), dtype=np.int64)
        keep = (raw.str.strip_chars().str.len_bytes() > 0).to_numpy()
        too_long: list[tuple[int, str, int]] = []
        if lines.too_long:
            for no in [no for no in lines.too_long if start <= no < start + len(chunk)]:
                too_long.append((no, chunk[no - start], lines.too_long.pop(no)))
                keep[no - start] = False
        if not keep.all():
            raw = raw.filter(pl.Series(keep))
            line = line[keep]
        if len(raw) or too_long:
            yield Lines(raw, line, too_long)


def too_long_records(source: str, too_long: list[tuple[int, str, int]], raw_max: int
                     ) -> list[Quarantined]:
    """A whole-reading ``parse_error`` per line too long to read, its text cut to ``raw_max``."""
    return [
        Quarantined(source=source, line=no, raw=clip_raw(text, raw_max, size),
                    reason="parse_error")
        for no, text, size in too_long
    ]  # fmt: skip


# --------------------------------------------------------------------------------------
# Splitting


def split_header(line: str, sep: str) -> list[str]:
    """The cells of a header line, unquoted and stripped."""
    try:
        cells = next(csv.reader([line], delimiter=sep))
    except (csv.Error, StopIteration):
        cells = line.split(sep)
    return [c.strip() for c in cells]


def split_rows(raw: pl.Series, sep: str, ncols: int) -> tuple[list[pl.Series], np.ndarray]:
    """Split lines into ``ncols`` stripped text cells each, and which lines could be split.

    Lines without a quote character are split vectorized; the few with quotes go through the
    csv module so quoted separators are honoured. A line with fewer cells than the header (but
    at least two) left its trailing cells off, as SCADA exports do with empty fields: the
    missing cells are null, "not measured". A line with more cells, a single cell, or quotes
    that do not pair up is marked not ok and its cells are null. Quotes come in pairs in every
    complete CSV record (a quote inside a quoted field is doubled), so an odd count is a piece
    of a quoted field that spans lines (a comment with a line break): both pieces are rejected,
    never read as a reading of a node named after half a comment.
    """
    n = len(raw)
    has_quote = raw.str.contains('"', literal=True).fill_null(False).to_numpy()
    if ncols == 1:
        cols = [raw.str.strip_chars().str.strip_chars('"')]
        return cols, np.ones(n, dtype=bool)
    count = raw.str.count_matches(sep, literal=True).fill_null(-1).to_numpy()
    ok = (count >= 1) & (count <= ncols - 1) & ~has_quote
    parts = raw.str.split_exact(sep, ncols - 1).struct.unnest()
    # Checking for blanks is cheaper than stripping (no new strings); padding is rare.
    padded = bool(
        raw.str.contains(" ", literal=True).any() or raw.str.contains("\t", literal=True).any()
    )
    cols = [parts.to_series(j) for j in range(ncols)]
    if padded:
        cols = [c.str.strip_chars() for c in cols]
    if has_quote.any():
        idx = np.flatnonzero(has_quote)
        rows: list[list[str | None]] = []
        for i in idx:
            line = raw[int(i)]
            try:
                cells = [] if line.count('"') % 2 else next(
                    csv.reader([line], delimiter=sep, strict=True)
                )
            except (csv.Error, StopIteration):
                cells = []
            if 1 < len(cells) <= ncols:
                ok[i] = True
                rows.append([c.strip() for c in cells] + [None] * (ncols - len(cells)))
            else:
                rows.append([None] * ncols)
        positions = pl.Series(idx, dtype=pl.Int64)
        cols = [
            c.scatter(positions, pl.Series([r[j] for r in rows], dtype=pl.String))
            for j, c in enumerate(cols)
        ]
    return cols, ok


# --------------------------------------------------------------------------------------
# Numbers

_NON_FINITE_WORDS = ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                     "-infinity"]  # fmt: skip
#: Markers of "no value" in wide SCADA reports (FORMATS.md section 2), lower-cased.
WIDE_MISSING = ["", "-", "--", "n/d", "n.d.", "nd", "nan", "n/a", "na", "null"]
_COMMA_NUMBER = r"^[+-]?(?:\d{1,3}(?:\.\d{3})+|\d*)(?:,\d*)?(?:[eE][+-]?\d+)?$"


def parse_numbers(
    cells: pl.Series, *, decimal_comma: bool = False, missing: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numbers from text cells, vectorized.

    Args:
        cells: stripped text cells (null = no cell).
        decimal_comma: ``1.234,5`` style (dots group thousands) instead of ``1234.5``.
        missing: lower-cased markers meaning "not measured" besides the empty cell; when
            given, ``nan`` among them is a missing value rather than a non-finite one.

    Returns:
        ``(values, present, code)``: float64 values (NaN where missing or rejected), whether
        the cell held anything, and a reason code per cell (``OK``, ``PARSE_ERROR`` or
        ``NON_FINITE``).

    """
    n = len(cells)
    markers = missing if missing is not None else [""]
    if decimal_comma:
        shaped = cells.str.contains(_COMMA_NUMBER).fill_null(False) & cells.str.contains(r"\d")
        text = cells.str.replace_all(".", "", literal=True).str.replace(",", ".", literal=True)
        # Outside the comma style (e.g. "3.52" in a comma file) a cell is not a number, so it
        # is rejected instead of being read as 352.
        text = pl.select(pl.when(shaped).then(text).otherwise(None)).to_series()
    else:
        text = cells
    values = text.cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy()
    values = values.astype(np.float64, copy=True)
    present = (
        cells.is_not_null().to_numpy() & (cells.str.len_bytes() > 0).fill_null(False).to_numpy()
    )
    code = np.zeros(n, dtype=np.int8)
    # Only the cells that did not read as a finite number need a closer look (markers,
    # padding, non-finite words): rare on the happy path, so the slow steps run on few cells.
    odd = np.flatnonzero(present & ~np.isfinite(values))
    if odd.size:
        sub = cells.gather(odd).str.strip_chars()
        low = sub.str.to_lowercase()
        absent = low.is_in(markers).to_numpy()
        nonfinite = low.is_in(_NON_FINITE_WORDS).to_numpy() & ~absent
        retry = sub
        if decimal_comma:
            ok_shape = sub.str.contains(_COMMA_NUMBER) & sub.str.contains(r"\d")
            retry = sub.str.replace_all(".", "", literal=True).str.replace(",", ".", literal=True)
            retry = pl.select(pl.when(ok_shape).then(retry).otherwise(None)).to_series()
        again = retry.cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy()
        fine = np.isfinite(again) & ~absent & ~nonfinite
        values[odd] = np.where(fine, again, np.nan)
        present[odd[absent]] = False
        inf_parsed = ~np.isnan(again) & ~np.isfinite(again)
        code[odd[~absent & ~fine & (nonfinite | inf_parsed)]] = NON_FINITE
        code[odd[~absent & ~fine & ~(nonfinite | inf_parsed)]] = PARSE_ERROR
    return values, present, code


def detect_decimal_comma(sample: list[str], sep: str) -> bool:
    """Whether the numbers of a file use a decimal comma, judged on a sample of its lines."""
    if sep == ",":
        return False
    comma = dot = 0
    for line in sample:
        for cell in line.split(sep):
            c = cell.strip().strip('"')
            if re.fullmatch(r"[+-]?\d[\d.]*,\d+", c):
                comma += 1
            elif re.fullmatch(r"[+-]?\d+\.\d+", c):
                dot += 1
    return comma > 0 and comma >= dot


# --------------------------------------------------------------------------------------
# Times

_TIME = r"(?:[T ]+(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<f>\d{1,9}))?)?)?"
_PATTERNS = (
    # ISO-8601 (date, optional time, optional offset)
    r"^(?P<Y>\d{4})-(?P<M>\d{1,2})-(?P<D>\d{1,2})" + _TIME
    + r"\s*(?P<z>[Zz]|UTC|[+-]\d{2}(?::?\d{2})?)?$",
    # SCADA reports: DD/MM/YYYY [HH:MM[:SS]]
    r"^(?P<D>\d{1,2})[/.-](?P<M>\d{1,2})[/.-](?P<Y>\d{4})" + _TIME + "$",
    # Hidroconta: YYYY/MM/DD HH:MM:SS
    r"^(?P<Y>\d{4})/(?P<M>\d{1,2})/(?P<D>\d{1,2})" + _TIME + "$",
)  # fmt: skip
_PARTS = ("Y", "M", "D", "h", "mi", "s", "f", "z")


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    # Howard Hinnant's algorithm: exact proleptic-Gregorian day count, vectorized.
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    mp = np.where(m > 2, m - 3, m + 9)
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _month_days(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    base = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31], dtype=np.int64)
    return base[np.clip(m - 1, 0, 12)] + (leap & (m == 2))


#: Exact layouts parsed by chrono first (several times faster than the regex path); text
#: that none of them reads goes through the lenient regexes of ``_PATTERNS``.
_FAST = (
    ("%Y-%m-%dT%H:%M:%S%.fZ", True),  # UTC, as `waterflow simulate` and most exports write it
    ("%Y-%m-%dT%H:%M:%S%.f%:z", True),
    ("%Y-%m-%dT%H:%M:%S%.f", False),
    ("%d/%m/%Y %H:%M:%S", False),
    ("%d/%m/%Y %H:%M", False),
    ("%Y/%m/%d %H:%M:%S", False),
)


def parse_clock(text: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wall-clock times from text: the three layouts of FORMATS.md, vectorized.

    Returns:
        ``(us, has_offset, ok)``: µs since the epoch (UTC when the text had an offset,
        otherwise the local wall clock read as if it were UTC), whether it had an offset, and
        whether it could be read at all.

    """
    n = len(text)
    s = text.str.strip_chars()
    us = np.zeros(n, dtype=np.int64)
    has_offset = np.zeros(n, dtype=bool)
    ok = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(s.is_not_null().to_numpy())
    for fmt, offset in _FAST:
        if idx.size == 0:
            return us, has_offset, ok
        sub = s if idx.size == n else s.gather(idx)
        if offset:
            got = sub.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        else:
            got = sub.str.to_datetime(fmt, strict=False, time_unit="us")
        # chrono accepts a few layouts the spec does not (e.g. a 5-digit year); the regex
        # path below decides those.
        hit = (got.is_not_null() & (sub.str.len_bytes() <= 40)).to_numpy()
        if hit.any():
            where = idx[hit]
            us[where] = got.dt.epoch("us").to_numpy()[hit]
            has_offset[where] = offset
            ok[where] = True
            idx = idx[~hit]
    if idx.size:
        r_us, r_off, r_ok = _parse_clock_regex(s.gather(idx))
        us[idx], has_offset[idx], ok[idx] = r_us, r_off, r_ok
    return us, has_offset, ok


def _parse_clock_regex(s: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(s)
    got: dict[str, pl.Series | None] = dict.fromkeys(_PARTS)
    pending = s.is_not_null()
    for pat in _PATTERNS:
        if not pending.any():
            break
        groups = s.str.extract_groups(pat)
        names = set(groups.struct.fields)
        hit = groups.struct.field("Y").is_not_null()
        for p in _PARTS:
            if p not in names:
                continue
            col = groups.struct.field(p)
            prev = got[p]
            got[p] = col if prev is None else pl.select(pl.coalesce(prev, col)).to_series()
        pending = pending & ~hit

    def ints(p: str, default: int = 0) -> np.ndarray:
        col = got[p]
        if col is None:
            return np.full(n, default, dtype=np.int64)
        return col.cast(pl.Int64, strict=False).fill_null(default).to_numpy().astype(np.int64)

    year_col = got["Y"]
    ok = np.zeros(n, dtype=bool) if year_col is None else year_col.is_not_null().to_numpy()
    y, mo, d = ints("Y", 1970), ints("M", 1), ints("D", 1)
    h, mi, sec = ints("h"), ints("mi"), ints("s")
    frac = np.zeros(n, dtype=np.int64)
    if got["f"] is not None:
        frac = (
            got["f"].str.pad_end(6, "0").str.slice(0, 6).cast(pl.Int64, strict=False)
            .fill_null(0).to_numpy().astype(np.int64)
        )  # fmt: skip
    ok &= (mo >= 1) & (mo <= 12) & (d >= 1) & (d <= _month_days(y, mo))
    ok &= (h <= 23) & (mi <= 59) & (sec <= 59)
    us = _days_from_civil(y, mo, d) * US_PER_DAY + h * US_PER_HOUR + mi * US_PER_MIN
    us += sec * US_PER_S + frac
    has_offset = np.zeros(n, dtype=bool)
    z = got["z"]
    if z is not None:
        has_offset = z.is_not_null().to_numpy()
        zu = z.str.to_uppercase()
        sign = np.where(zu.str.slice(0, 1).to_numpy() == "-", -1, 1)
        digits = zu.str.replace_all(":", "", literal=True)
        oh = digits.str.slice(1, 2).cast(pl.Int64, strict=False).fill_null(0).to_numpy()
        om = digits.str.slice(3, 2).cast(pl.Int64, strict=False).fill_null(0).to_numpy()
        ok &= ~has_offset | ((oh <= 18) & (om <= 59))
        offset = sign * (oh * US_PER_HOUR + om * US_PER_MIN)
        us = np.where(has_offset, us - offset, us)
    us[~ok] = 0
    return us.astype(np.int64), has_offset & ok, ok


class LocalTime:
    """Local wall-clock times to UTC in one zone, DST included, across chunks of a file.

    In the autumn the repeated hour appears twice: the first occurrence of a wall-clock time
    (per key, e.g. per node) is the earlier instant (still summer time), the next one the
    later instant. The state is the count of ambiguous times seen, so it stays tiny.
    Nonexistent spring-forward times are reported as not ok.
    """

    def __init__(self, tz: str) -> None:
        self.tz = tz
        self._seen: dict[tuple[object, int], int] = {}

    def to_utc(
        self, local: np.ndarray, keys: pl.Series | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """UTC µs and an ok mask for local wall-clock µs (``keys`` separate the series)."""
        n = len(local)
        if n == 0 or self.tz == "UTC":
            return local.copy(), np.ones(n, dtype=bool)
        naive = pl.Series(local, dtype=pl.Int64).cast(pl.Datetime("us"))
        early = naive.dt.replace_time_zone(self.tz, ambiguous="earliest", non_existent="null")
        late = naive.dt.replace_time_zone(self.tz, ambiguous="latest", non_existent="null")
        e = early.dt.epoch("us")
        ok = e.is_not_null().to_numpy()
        utc = e.fill_null(0).to_numpy().astype(np.int64)
        lt = late.dt.epoch("us").fill_null(0).to_numpy().astype(np.int64)
        ambiguous = ok & (utc != lt)
        if ambiguous.any():
            for i in np.flatnonzero(ambiguous):
                key = (None if keys is None else keys[int(i)], int(local[i]))
                seen = self._seen.get(key, 0)
                self._seen[key] = seen + 1
                if seen:
                    utc[i] = lt[i]
            if len(self._seen) > 100_000:
                # Only times near the latest ambiguous hour can still repeat.
                newest = int(local[ambiguous].max())
                self._seen = {k: v for k, v in self._seen.items() if k[1] > newest - US_PER_DAY}
        return utc, ok


def parse_times(
    text: pl.Series, local: LocalTime, keys: pl.Series | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """UTC µs and an ok mask for timestamp text (offset honoured, else local time)."""
    us, has_offset, ok = parse_clock(text)
    naive = ok & ~has_offset
    if naive.any():
        idx = np.flatnonzero(naive)
        sub_keys = None if keys is None else keys.gather(idx)
        utc, good = local.to_utc(us[idx], sub_keys)
        us[idx] = utc
        ok[idx] = good
    return us, ok


# --------------------------------------------------------------------------------------
# Assembly of readings


@dataclass(slots=True)
class Measure:
    """One measurement column of a chunk, already converted to canonical units."""

    measurement: str | None  # None: the column cannot be mapped (its cells are rejected)
    header: str
    values: np.ndarray
    present: np.ndarray
    code: np.ndarray
    cells: pl.Series


def node_id_problems(node: pl.Series) -> np.ndarray:
    """Reason code per node id cell: missing, unreadable (control characters, too long), ok."""
    code = np.zeros(len(node), dtype=np.int8)
    empty = (node.is_null() | (node.str.len_bytes() == 0)).fill_null(True).to_numpy()
    bad = (
        node.str.contains(r"\p{Cc}") | (node.str.len_chars() > MAX_NODE_ID)
    ).fill_null(False).to_numpy()  # fmt: skip
    code[bad] = PARSE_ERROR
    code[empty] = MISSING_FIELD
    return code


def assemble(
    *,
    source: str,
    raw: pl.Series,
    line: np.ndarray,
    node: pl.Series | str,
    ts: np.ndarray,
    ts_ok: np.ndarray,
    reason: np.ndarray,
    measures: list[Measure],
    names: dict[str, str],
    seen: set[str],
    raw_max: int,
) -> tuple[list[ReadingBatch], list[Quarantined], list[NodeInfo]]:
    """Readings of a chunk, one per row: batches per node, quarantine records, new nodes.

    ``reason`` holds a whole-reading reason per row found before looking at the values
    (bad line, missing node, bad timestamp). A row whose present values are all rejected is
    quarantined whole with the first value's reason; otherwise the rejected values are
    quarantined one by one (``whole_reading=False``) and the reading is kept. A record keeps
    at most ``raw_max`` bytes of its text (:func:`clip_raw`).
    """
    n = len(line)
    reason = reason.copy()
    good_any = np.zeros(n, dtype=bool)
    first_bad = np.zeros(n, dtype=np.int8)
    first_bad_col = np.full(n, -1, dtype=np.int64)
    for j, m in enumerate(measures):
        bad = m.present & (m.code != OK)
        good_any |= m.present & (m.code == OK)
        fresh = bad & (first_bad == OK)
        first_bad[fresh] = m.code[fresh]
        first_bad_col[fresh] = j
    whole = (reason == OK) & (first_bad != OK) & ~good_any
    reason[whole] = first_bad[whole]
    keep = reason == OK

    def node_at(i: int) -> str | None:
        if isinstance(node, str):
            return node
        v = node[i]
        return v if v else None

    quarantined: list[Quarantined] = []
    for i in np.flatnonzero(~keep):
        ii = int(i)
        code = int(reason[ii])
        j = int(first_bad_col[ii]) if whole[ii] else -1
        quarantined.append(
            Quarantined(
                source=source,
                line=int(line[ii]),
                raw=clip_raw(raw[ii], raw_max),
                reason=REASONS[code],
                node_id=node_at(ii),
                ts=int(ts[ii]) if ts_ok[ii] else None,
                measurement=measures[j].measurement if j >= 0 else None,
            )
        )
    for m in measures:
        bad_cells = keep & m.present & (m.code != OK)
        for i in np.flatnonzero(bad_cells):
            ii = int(i)
            quarantined.append(
                Quarantined(
                    source=source,
                    line=int(line[ii]),
                    raw=clip_raw(f"{m.header}={m.cells[ii]}", raw_max),
                    reason=REASONS[int(m.code[ii])],
                    node_id=node_at(ii),
                    ts=int(ts[ii]),
                    measurement=m.measurement,
                    whole_reading=False,
                )
            )
    quarantined.sort(key=lambda q: q.line)

    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return [], quarantined, []
    values = empty_values(idx.size)
    for m in measures:
        if m.measurement is not None:
            col = m.values[idx]
            sel = m.present[idx] & (m.code[idx] == OK)
            values[sel, COL[m.measurement]] = col[sel]
    k_ts, k_line = ts[idx], line[idx]

    batches: list[ReadingBatch] = []
    if isinstance(node, str):
        groups: list[tuple[str, np.ndarray | slice]] = [(node, slice(None))]
    else:
        kept = node.gather(idx)
        if kept.n_unique() == 1:
            groups = [(kept[0], slice(None))]
        else:
            # Group by node in order of first appearance with one stable argsort: per-node
            # Python work stays per node, never per reading.
            order_of = kept.unique(maintain_order=True)
            group_of = kept.replace_strict(
                order_of, pl.int_range(len(order_of), eager=True), return_dtype=pl.Int64
            ).to_numpy()
            order = np.argsort(group_of, kind="stable")
            sizes = np.bincount(group_of, minlength=len(order_of))
            bounds = np.concatenate(([0], np.cumsum(sizes)))
            groups = [
                (nid, order[bounds[g] : bounds[g + 1]]) for g, nid in enumerate(order_of.to_list())
            ]
    new_nodes: list[NodeInfo] = []
    for nid, sel in groups:
        batches.append(
            ReadingBatch(
                node_id=nid,
                source=source,
                ts=np.ascontiguousarray(k_ts[sel]),
                values=np.ascontiguousarray(values[sel]),
                line=np.ascontiguousarray(k_line[sel]),
            )
        )
        if nid not in seen:
            seen.add(nid)
            new_nodes.append(NodeInfo(node_id=nid, name=names.get(nid, nid), source=source))
    return batches, quarantined, new_nodes


def whole_records(
    source: str,
    raw: pl.Series,
    line: np.ndarray,
    rows: np.ndarray,
    reason: str,
    raw_max: int,
    node_id: str | None = None,
) -> list[Quarantined]:
    """One whole-reading quarantine record per selected row, with (at most raw_max of) its line."""
    return [
        Quarantined(source=source, line=int(line[i]), raw=clip_raw(raw[int(i)], raw_max),
                    reason=reason, node_id=node_id)
        for i in np.flatnonzero(rows)
    ]  # fmt: skip


def header_separator(header: str) -> str:
    """The separator of a header line: the most frequent of ``,``, ``;`` and tab (``,`` if none).

    Counting rather than testing for presence: a ``;`` report may hold commas inside its
    column names (``NODO VIA ROMA, 12 - PRESSIONE``).
    """
    counts = {sep: header.count(sep) for sep in (",", ";", "\t")}
    return max(counts, key=lambda sep: counts[sep]) if any(counts.values()) else ","
