"""Record types shared by the dataflows and the connectors.

This is the bottom module of the project: it imports nothing of the project, so connectors
can depend on it without depending on the dataflows. Readings travel in per-node batches of
numpy arrays (DESIGN.md, "Performance design"): per-item Python work costs microseconds, a
vectorized pass over a batch costs nanoseconds per reading.

Times inside the system are int64 microseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import numpy as np

#: Canonical measurements, in column order of ``ReadingBatch.values``.
MEASUREMENTS: tuple[str, ...] = (
    "flow_rate",
    "pressure",
    "temperature",
    "total_flow",
    "level",
    "chlorine",
    "ph",
    "turbidity",
    "conductivity",
    "redox",
)
#: Column index of each measurement in ``ReadingBatch.values``.
COL: dict[str, int] = {name: i for i, name in enumerate(MEASUREMENTS)}
#: Canonical unit of each measurement (DESIGN.md, "Records and units").
UNITS: dict[str, str] = {
    "flow_rate": "L/s",
    "pressure": "bar",
    "temperature": "degC",
    "total_flow": "m3",
    "level": "m",
    "chlorine": "mg/L",
    "ph": "pH",
    "turbidity": "NTU",
    "conductivity": "uS/cm",
    "redox": "mV",
}

US_PER_S = 1_000_000
US_PER_MIN = 60 * US_PER_S
US_PER_HOUR = 60 * US_PER_MIN
US_PER_DAY = 24 * US_PER_HOUR


class Flag(enum.IntFlag):
    """Quality flags carried by accepted readings (``ReadingBatch.flags``)."""

    OUT_OF_ORDER = 1  # older than a reading already seen for the node
    LATE = 2  # behind the window watermark: kept as a raw reading, not in any KPI window
    GAP_BEFORE = 4  # the interval since the previous reading exceeds the gap threshold
    STUCK = 8  # part of a flat line longer than the stuck threshold
    SPIKE = 16  # a jump far outside the node's recent variability
    TOTALIZER_RESET = 32  # the totalizer went backwards (reset or rollover)
    TOTALIZER_MISMATCH = 64  # totalizer volume disagrees with integrated flow
    VALUE_REMOVED = 128  # one or more values of the reading were quarantined


def flag_names(bits: int) -> list[str]:
    """Names of the flags set in ``bits``.

    >>> flag_names(Flag.STUCK | Flag.LATE)
    ['LATE', 'STUCK']
    """
    bits = int(bits)
    return [name for bit, name in _FLAG_BITS if bits & bit]


#: (bit, name) of every flag, in definition order: testing ints, not enum members (10x faster).
_FLAG_BITS = tuple((int(f), f.name or "") for f in Flag)


@dataclass(frozen=True, slots=True)
class ReadingBatch:
    """Readings of one node, in arrival order.

    ``values`` has one row per reading and one column per entry of ``MEASUREMENTS``; NaN means
    "not measured". ``line`` is the 1-based line of the source file (0 when there is none), so
    a rejected reading can always be traced back to its raw text. ``quality``, ``flags`` and
    ``score`` are filled by validation and anomaly scoring.
    """

    node_id: str
    source: str
    ts: np.ndarray  # int64 µs UTC, shape (n,)
    values: np.ndarray  # float64, shape (n, len(MEASUREMENTS))
    line: np.ndarray  # int64, shape (n,)
    quality: np.ndarray | None = None  # float64 in [0, 1]
    flags: np.ndarray | None = None  # int64 bitmask of Flag
    score: np.ndarray | None = None  # float64 anomaly score in [0, 1]

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, index: np.ndarray) -> ReadingBatch:
        """The readings selected by a boolean mask or an index array, all arrays alike."""

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return replace(
            self,
            ts=self.ts[index],
            values=self.values[index],
            line=self.line[index],
            quality=pick(self.quality),
            flags=pick(self.flags),
            score=pick(self.score),
        )

    @staticmethod
    def concat(batches: list[ReadingBatch]) -> ReadingBatch:
        """One batch from several batches of the same node (optional arrays must agree)."""
        first = batches[0]

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(b, name) for b in batches]
            if any(a is None for a in arrays):
                return None
            return np.concatenate(arrays)

        return ReadingBatch(
            node_id=first.node_id,
            source=first.source,
            ts=np.concatenate([b.ts for b in batches]),
            values=np.concatenate([b.values for b in batches]),
            line=np.concatenate([b.line for b in batches]),
            quality=cat("quality"),
            flags=cat("flags"),
            score=cat("score"),
        )


def empty_values(n: int) -> np.ndarray:
    """An (n, measurements) array of NaN: nothing measured yet."""
    return np.full((n, len(MEASUREMENTS)), np.nan, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A record that did not become (part of) an accepted reading, with the reason why.

    ``whole_reading`` is True when a whole reading (or an unreadable line) was rejected; it is
    False when a single value was removed from a reading that was otherwise accepted (a bad
    cell of a wide report, one measurement out of range). Only whole readings enter the
    run's reconciliation: readings in = accepted + quarantined (whole) + duplicates dropped.
    """

    source: str
    line: int
    raw: str
    reason: str
    node_id: str | None = None
    ts: int | None = None  # µs UTC, when it could be read
    measurement: str | None = None
    whole_reading: bool = True


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a source file tells about a node: its id and display name, maybe more."""

    node_id: str
    name: str
    source: str = ""
    district: str | None = None
    role: str | None = None
    lat: float | None = None
    lon: float | None = None


@dataclass(slots=True)
class ParsedChunk:
    """What a reader produced from one chunk of one source.

    ``readings_in`` counts the readings the chunk held: those turned into batches plus the
    whole-reading quarantine records. Values quarantined alone do not count (their reading
    is counted once, in the batches).
    """

    source: str
    batches: list[ReadingBatch] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    nodes: list[NodeInfo] = field(default_factory=list)

    @property
    def readings_in(self) -> int:
        return sum(len(b) for b in self.batches) + sum(
            1 for q in self.quarantined if q.whole_reading
        )


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    """One incident on one node and measurement, opened and closed with hysteresis.

    ``ended_at`` is None while the incident is open. The id is deterministic (node,
    measurement, start), so re-scoring the same data upserts the same event.
    """

    anomaly_id: str
    node_id: str
    measurement: str
    kind: str
    started_at: int  # µs UTC
    ended_at: int | None
    peak_score: float
    expected_lo: float
    expected_hi: float
    observed: float
