"""The output tables of the contract (DESIGN.md, "The contract, in detail"), as frame schemas.

Every result leaves the dataflow as ``TableRows``: a table name of the contract and a polars
frame whose columns are exactly ``SCHEMAS[table]``. The warm tier (PostgreSQL), the hot tier
(Redis) and the cold archive (Parquet, BigQuery) all take these frames, so one pure mapping
serves every sink. Times are ``Datetime("us", "UTC")``; ``day`` is the local calendar day.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl

from dataflows.model import MEASUREMENTS

UTC_US = pl.Datetime("us", "UTC")

_MEASUREMENT_COLUMNS = {m: pl.Float64 for m in MEASUREMENTS}
_WINDOW_STATS = {
    f"{m}_{stat}": pl.Float64 for m in MEASUREMENTS for stat in ("avg", "min", "max", "std")
}

SCHEMAS: dict[str, dict[str, pl.DataType | type[pl.DataType]]] = {
    "nodes": {
        "node_id": pl.String,
        "name": pl.String,
        "district": pl.String,
        "role": pl.String,
        "lat": pl.Float64,
        "lon": pl.Float64,
        "source": pl.String,
    },
    "readings": {
        "node_id": pl.String,
        "ts": UTC_US,
        **_MEASUREMENT_COLUMNS,
        "quality": pl.Float64,
        "flags": pl.List(pl.String),
        "anomaly_score": pl.Float64,
        "source": pl.String,
        "run_id": pl.String,
    },
    "kpi_15m": {
        "node_id": pl.String,
        "window_start": UTC_US,
        "n": pl.Int64,
        "completeness": pl.Float64,
        **_WINDOW_STATS,
        "volume_m3": pl.Float64,
        "quality_avg": pl.Float64,
        "score_max": pl.Float64,
    },
    "kpi_daily": {
        "node_id": pl.String,
        "day": pl.Date,
        "n": pl.Int64,
        "completeness": pl.Float64,
        "volume_m3": pl.Float64,
        "mnf": pl.Float64,  # minimum night flow, L/s
        "pressure_compliance": pl.Float64,  # share of readings in the service band, 0..1
        "water_quality_compliance": pl.Float64,  # share of quality readings within limits
        "flow_rate_avg": pl.Float64,
        "flow_rate_min": pl.Float64,
        "flow_rate_max": pl.Float64,
        "pressure_avg": pl.Float64,
        "pressure_min": pl.Float64,
        "pressure_max": pl.Float64,
    },
    "district_balance": {
        "district": pl.String,
        "period": pl.String,  # 'hour' | 'day': the local hour or day starting at period_start
        "period_start": UTC_US,
        "inflow_m3": pl.Float64,  # into the district, by its inflow meters
        "consumption_m3": pl.Float64,
        "loss_m3": pl.Float64,  # system input - consumption
        "nrw": pl.Float64,  # non-revenue water share of the system input, 0..1
        "outflow_m3": pl.Float64,  # exported to other districts, by its outflow meters
        "system_input_m3": pl.Float64,  # inflow - outflow
        "filled_share": pl.Float64,  # share of the metered volume estimated from patterns
        "estimated": pl.Boolean,  # filled_share > 0.5: the balance rests on estimates
        # Day rows only (NULL on hour rows):
        "mnf_lps": pl.Float64,  # minimum night flow of the system input, L/s
        "mnf_baseline_lps": pl.Float64,  # median MNF of the earlier (up to 30) clean nights
        "mnf_trend_lps_per_day": pl.Float64,  # least-squares slope of the last 30 nights
        "leak_lps": pl.Float64,  # estimated leak rate while a leak is suspected
        "peak_hour": pl.Int16,  # local hour of the day's highest hourly system input
        "peak_lps": pl.Float64,  # ...and that hour's mean flow, L/s
        "pressure_m": pl.Float64,  # average zone pressure, m (loggers' mean or the network's)
        "ili": pl.Float64,  # infrastructure leakage index (needs mains and connections)
    },
    "anomalies": {
        "anomaly_id": pl.String,
        "node_id": pl.String,
        "started_at": UTC_US,
        "ended_at": UTC_US,  # null while open
        "peak_score": pl.Float64,
        "kind": pl.String,
        "measurement": pl.String,
        "expected_lo": pl.Float64,
        "expected_hi": pl.Float64,
        "observed": pl.Float64,
    },
    "forecasts": {
        "node_id": pl.String,  # a node, or a district (its id) for a district's demand
        "issued_at": UTC_US,  # a local midnight
        "target_ts": UTC_US,  # the hour starting then
        "model": pl.String,
        "yhat": pl.Float64,  # mean flow of the hour, L/s
        "yhat_lo": pl.Float64,  # prediction interval (5 %, 95 %)
        "yhat_hi": pl.Float64,
    },
    "forecast_accuracy": {
        "node_id": pl.String,
        "model": pl.String,
        "horizon_h": pl.Int64,  # the horizon band's last hour: 24 (1-24), 72 (25-72), 168
        "period_start": UTC_US,  # the local day of the actuals
        "mae": pl.Float64,  # L/s
        "mape": pl.Float64,  # share, 0.1 = 10 %
        "n": pl.Int64,  # hours scored
    },
    "quarantine": {
        "id": pl.String,  # deterministic: a replay of the same file upserts, never duplicates
        "run_id": pl.String,
        "source": pl.String,
        "line": pl.Int64,
        "node_id": pl.String,
        "ts": UTC_US,
        "measurement": pl.String,
        "reason": pl.String,
        "raw": pl.String,
        "whole_reading": pl.Boolean,
        "received_at": UTC_US,
    },
    "ingest_runs": {
        "run_id": pl.String,
        "started_at": UTC_US,
        "finished_at": UTC_US,
        "source": pl.String,
        "rows_in": pl.Int64,
        "accepted": pl.Int64,
        "quarantined": pl.Int64,
        "duplicates": pl.Int64,
        "values_quarantined": pl.Int64,
        "late": pl.Int64,
        "status": pl.String,  # 'running' from the flow; 'finished' set by the command after it
        "updated_at": UTC_US,  # the flow's last heartbeat
        "heartbeat_s": pl.Float64,  # ...which comes every this many seconds while it runs
    },
}

#: Each table's column names as a set, to check the columns of rows made many times a batch.
_COLUMN_SETS = {table: frozenset(schema) for table, schema in SCHEMAS.items()}

#: Natural key of each table: what an upsert matches on.
KEYS: dict[str, tuple[str, ...]] = {
    "nodes": ("node_id",),
    "readings": ("node_id", "ts"),
    "kpi_15m": ("node_id", "window_start"),
    "kpi_daily": ("node_id", "day"),
    "district_balance": ("district", "period", "period_start"),
    "anomalies": ("anomaly_id",),
    "forecasts": ("node_id", "issued_at", "target_ts", "model"),
    "forecast_accuracy": ("node_id", "model", "horizon_h", "period_start"),
    "quarantine": ("id",),
    "ingest_runs": ("run_id",),
}


class Coded:
    """A column as codes into a few distinct values: row ``i`` holds ``values[codes[i]]``.

    Most columns of a node batch's rows repeat one value (the node id, the source, the run) or
    a few (its readings' flag lists). Given so, parts join by concatenating their codes and
    polars builds the column with one gather, instead of from one Python object per row
    (200 000 node ids and flag lists: 0.3 s).

    >>> c = Coded.repeat("n1", 3)
    >>> len(c), c.tolist()
    (3, ['n1', 'n1', 'n1'])
    """

    __slots__ = ("codes", "values")

    def __init__(self, codes: np.ndarray, values: list[Any]) -> None:
        self.codes = codes
        self.values = values

    @staticmethod
    def repeat(value: Any, n: int) -> Coded:
        """``value`` on each of ``n`` rows."""
        return Coded(np.zeros(n, np.int64), [value])

    def __len__(self) -> int:
        return len(self.codes)

    def tolist(self) -> list[Any]:
        return [self.values[c] for c in self.codes.tolist()]


class TableRows:
    """Rows for one table of the contract, ready for any tier.

    Made from a polars frame, or from column data (``frame()``): then the frame is built only
    when ``frame`` is first asked for, and ``concat_rows`` joins column data (numpy arrays,
    lists, ``Coded``) before building one frame. A live flow makes rows for every small node
    batch, and a polars frame costs about 0.1 ms to build: one per write instead of one per
    node batch.
    Column data is never changed nor dropped once given: tiers write from several threads, and
    two of them building the same frame at once both build it whole.
    """

    __slots__ = ("table", "height", "_frame", "_columns")

    def __init__(
        self,
        table: str,
        frame: pl.DataFrame | None = None,
        *,
        columns: dict[str, Any] | None = None,
    ) -> None:
        self.table = table
        if frame is not None:
            expected = list(SCHEMAS[table])
            if frame.columns != expected:
                raise ValueError(
                    f"rows for {table!r} have columns {frame.columns}, expected {expected}"
                )
            self._frame: pl.DataFrame | None = frame
            self._columns: dict[str, Any] | None = None
            self.height = frame.height
            return
        columns = columns or {}
        unknown = columns.keys() - _COLUMN_SETS[table]
        if unknown:
            raise ValueError(f"rows for {table!r} have unknown columns {sorted(unknown)}")
        self._frame = None
        self._columns = columns
        # Every column has the rows' length (the frame refuses otherwise): the first says it.
        self.height = len(next(iter(columns.values()))) if columns else 0

    @property
    def frame(self) -> pl.DataFrame:
        """The rows as a frame with exactly ``SCHEMAS[table]`` (built once, on first use)."""
        built = self._frame
        if built is None:
            columns, n = self._columns or {}, self.height
            built = pl.DataFrame(
                [
                    _column(name, dtype, columns[name])
                    if name in columns
                    else pl.Series(name, [None] * n, dtype=dtype)
                    for name, dtype in SCHEMAS[self.table].items()
                ]
            )
            self._frame = built
        return built

    def array(self, name: str) -> np.ndarray:
        """One column as numpy, without building the frame where it is not built yet.

        Times are µs since the epoch (int64), dates days since the epoch, and nulls NaN in
        float columns.
        """
        dtype = SCHEMAS[self.table][name]
        if self._columns is not None:
            values = self._columns.get(name)
            if values is None:
                return np.full(self.height, np.nan if dtype == pl.Float64 else None)
            if isinstance(values, np.ndarray):
                if values.dtype.kind == "M":
                    return values.astype("datetime64[us]").astype(np.int64)
                return values.astype(np.float64) if dtype == pl.Float64 else values
        column = self.frame[name]
        if isinstance(dtype, pl.Datetime):
            return column.dt.epoch("us").to_numpy()
        if dtype == pl.Date:
            return column.cast(pl.Int64).to_numpy()
        if dtype == pl.Float64:
            return column.cast(pl.Float64).to_numpy()
        return column.to_numpy()

    def __getstate__(self) -> tuple[str, int, pl.DataFrame | None, dict[str, Any] | None]:
        # Column data when there is some (smaller), else the frame.
        return self.table, self.height, None if self._columns else self._frame, self._columns

    def __setstate__(
        self, state: tuple[str, int, pl.DataFrame | None, dict[str, Any] | None]
    ) -> None:
        self.table, self.height, self._frame, self._columns = state

    def __repr__(self) -> str:
        return f"TableRows({self.table!r}, {self.height} rows)"


def frame(table: str, columns: dict[str, Any]) -> TableRows:
    """Rows for ``table`` from column data, cast to the table's schema (missing columns null).

    NaN means "not measured" inside the dataflow; in every table it is a null (SQL NULL).
    Columns are numpy arrays (times as µs since the epoch or datetime64, dates as days since
    the epoch), lists, ``Coded`` or polars Series; the frame is built when first used
    (``TableRows``).
    """
    return TableRows(table, columns=columns)


def concat_rows(parts: list[TableRows]) -> TableRows:
    """The rows of several parts of one table, in order, as one ``TableRows``.

    Parts still holding column data are joined column by column (numpy arrays of one dtype,
    or lists); anything else goes through polars frames.
    """
    if len(parts) == 1:
        return parts[0]
    table = parts[0].table
    given = [p._columns for p in parts if p._columns is not None]
    if len(given) < len(parts):  # some part holds a frame only
        return _concat_frames(parts)
    heights = [p.height for p in parts]
    columns: dict[str, Any] = {}
    for name, dtype in SCHEMAS[table].items():
        pieces = [g.get(name) for g in given]
        if all(v is None for v in pieces):
            continue
        joined = _join_column(pieces, heights, dtype)
        if joined is None:
            return _concat_frames(parts)
        columns[name] = joined
    return TableRows(table, columns=columns)


def _concat_frames(parts: list[TableRows]) -> TableRows:
    return TableRows(parts[0].table, pl.concat([p.frame for p in parts], how="vertical"))


def _join_column(pieces: list[Any], heights: list[int], dtype: Any) -> Any:
    """One column of several parts (None where a part lacks it) joined; None if only polars can.

    A part without the column gets nulls: NaN in a float array, None in a list. The nulls are
    written into one preallocated array rather than made per part (a 10 000-node batch has
    10 000 parts, most without most columns).
    """
    present = [v for v in pieces if v is not None]
    missing = len(present) < len(pieces)
    if all(isinstance(v, Coded) for v in present):
        return _join_coded(pieces, heights)
    if any(isinstance(v, Coded) for v in present):
        pieces = [v.tolist() if isinstance(v, Coded) else v for v in pieces]
        present = [v for v in pieces if v is not None]
    if all(isinstance(v, np.ndarray) for v in present):
        kind = present[0].dtype
        if any(v.dtype != kind for v in present):
            return None
        if not missing:
            return np.concatenate(present)
        if dtype != pl.Float64 or kind != np.float64:
            return None
        out = np.full(sum(heights), np.nan)
        start = 0
        for v, h in zip(pieces, heights, strict=True):
            if v is not None:
                out[start : start + h] = v
            start += h
        return out
    if all(isinstance(v, list) for v in present) and not (missing and dtype == pl.Float64):
        return [
            x
            for v, h in zip(pieces, heights, strict=True)
            for x in (v if v is not None else [None] * h)
        ]
    return None


def _join_coded(pieces: list[Coded | None], heights: list[int]) -> Coded:
    """``Coded`` parts joined: each part's codes shifted past the values before it.

    Parts sharing one list of values (the same object) share its codes; a part without the
    column points at one more value, None (a null).
    """
    if all(v is not None and len(v.values) == 1 for v in pieces):  # one value per part
        return Coded(
            np.repeat(np.arange(len(pieces)), heights), [v.values[0] for v in pieces]  # type: ignore[union-attr]
        )
    values: list[Any] = []
    offsets: dict[int, int] = {}  # id of a part's values -> where they start in ``values``
    codes = []
    for v, h in zip(pieces, heights, strict=True):
        if v is None:
            codes.append(np.full(h, -1, np.int64))
            continue
        start = offsets.get(id(v.values))
        if start is None:
            start = offsets[id(v.values)] = len(values)
            values.extend(v.values)
        codes.append(v.codes + start)
    joined = np.concatenate(codes)
    joined[joined < 0] = len(values)
    return Coded(joined, [*values, None])


def concat_by_table(parts: Iterable[TableRows]) -> list[TableRows]:
    """One ``TableRows`` per table, tables in the order they first appear.

    Each table's rows stay in order: a writer's upsert keeps the last row of a key.
    """
    by_table: dict[str, list[TableRows]] = {}
    for p in parts:
        by_table.setdefault(p.table, []).append(p)
    return [concat_rows(ps) for ps in by_table.values()]


def _column(name: str, dtype: Any, values: Any) -> pl.Series:
    if isinstance(values, Coded):
        return _column(name, dtype, values.values).gather(values.codes)
    if isinstance(values, pl.Series):
        series = values.alias(name)
    elif isinstance(values, np.ndarray) and dtype == pl.Float64:
        return pl.Series(name, values, dtype=pl.Float64, nan_to_null=True)
    elif isinstance(values, np.ndarray) and values.dtype.kind in "iu" and dtype == UTC_US:
        # µs since the epoch: reinterpreted, not converted
        series = pl.Series(name, values.astype(np.int64, copy=False), dtype=pl.Int64)
    elif isinstance(values, np.ndarray) or isinstance(dtype, pl.List):
        # Python lists of lists: inferring and casting is ~25x faster than building them
        # with the nested dtype given (5 ms vs 0.2 ms for 1,000 flag lists).
        series = pl.Series(name, values, strict=False)
    else:
        series = pl.Series(name, values, dtype=dtype, strict=False)
    if dtype == pl.Float64:
        series = series.cast(pl.Float64).fill_nan(None)
    if series.dtype != dtype:
        series = series.cast(dtype)
    return series


def conform(table: str, data: pl.DataFrame) -> pl.DataFrame:
    """A frame read back from storage, its columns cast to ``table``'s schema, in its order.

    Parquet may hold null-only columns and BigQuery has no dtypes of its own for them.
    """
    return data.select([pl.col(name).cast(dtype) for name, dtype in SCHEMAS[table].items()])
