"""Water balance per district, hourly and daily, that one bad meter cannot fake.

The balance is built from the 15-minute volumes (``kpi_15m``) of the district's meters, by
their role in the network topology: ``inflow`` meters feed the district, ``outflow`` meters
export water to another district, ``consumption`` meters are what it delivers. System input =
inflow - outflow; losses = system input - consumption; NRW = losses / system input. Gaps and
untrusted (stuck, flagged, frozen) stretches of a meter are estimated from the meter's own
pattern (``dataflows.balance_fill``); ``filled_share`` is the share of the period's metered
volume that was estimated, and ``estimated`` marks a period built mostly (over
``ESTIMATED_SHARE``) from estimates. A meter that cannot be estimated yet (no pattern) makes
its side unknown (NULL), never zero. Day rows also carry the district's minimum night flow, its
baseline and 30-day trend, the leak rate when a leak is suspected, the daily peak hour, the
average pressure and the ILI (``dataflows.balance_night``).

Same result however the stream is cut and interleaved (a replay hands over a meter's weeks at
once, a live flow interleaves the meters minute by minute). Each meter's windows are kept as
their latest ``kpi_15m`` row (upserts), and a local day *closes* only when every meter of the
district (the topology's, reported yet or not) is past it by the KPI lateness, so its windows
are final: then its rows are written a last time, and only then do the meters' patterns and
the night-flow history learn from it, day after day in order. Rows of open days are written
as they change (upserts downstream), with the estimates as they stand; the final rows overwrite
them. At the end of the input, ``flush`` gives the final rows of the days still open (as if
they closed, on a copy: the state is kept). A meter silent for good holds the closing back at
most ``MAX_SPREAD_DAYS`` behind the newest meter, which bounds the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from dataflows.arrays import nan_to_num
from dataflows.balance_fill import (
    MISSING,
    WINDOW_US,
    Clock,
    Estimate,
    MeterProfile,
    MeterWindows,
    day_start_us,
    day_windows,
    estimate,
    hour_starts,
    local_day,
    measured_hours,
    meter_windows,
    span_clock,
)
from dataflows.balance_night import BAR_TO_M, NIGHT_HOURS, Night, NightFlow, ili
from dataflows.model import US_PER_HOUR, AnomalyEvent
from dataflows.settings import Settings
from dataflows.tables import TableRows, concat_rows, frame
from dataflows.topology import DistrictAssets, Network

BALANCE_ROLES = ("inflow", "outflow", "consumption")
#: Roles of the nodes the district step takes: the meters, and the pressure loggers (for ILI).
MEMBER_ROLES = (*BALANCE_ROLES, "pressure")
#: A meter more than this far behind the newest one no longer holds days open.
MAX_SPREAD_DAYS = 62
#: A period is ``estimated`` when more than this share of its metered volume was filled.
ESTIMATED_SHARE = 0.5
WINDOWS_PER_DAY = 96
WINDOWS_PER_HOUR = 4


@dataclass(slots=True)
class Meter:
    """One node's open windows, aligned with the district's span, and its learned pattern."""

    role: str
    volume: np.ndarray
    status: np.ndarray
    totalizer: np.ndarray
    pressure: np.ndarray
    newest: int = -1  # newest window seen
    first: int = -1  # first window seen (before it the meter was not in service)
    is_totalizer: bool = False
    counted_before: bool = False  # it had windows in days already closed
    profile: MeterProfile = field(default_factory=MeterProfile)

    def copy(self) -> Meter:
        """A copy whose arrays and pattern are its own."""
        return replace(self, volume=self.volume.copy(), status=self.status.copy(),
                       totalizer=self.totalizer.copy(), pressure=self.pressure.copy(),
                       profile=self.profile.copy())


@dataclass(slots=True)
class BalanceOutput:
    """Rows of ``district_balance`` (None when nothing changed) and district leak events."""

    rows: TableRows | None = None
    events: list[AnomalyEvent] = field(default_factory=list)


@dataclass(slots=True)
class _Series:
    """The district's window series over a range: volumes per role, filled and unknown."""

    c: Clock  # of the range
    role: dict[str, np.ndarray]  # m3 per window (NaN: unknown)
    filled: np.ndarray  # m3 estimated per window
    metered: np.ndarray  # m3 of every meter per window
    pressure: np.ndarray  # mean of the loggers' window pressures (bar), NaN where none
    active: np.ndarray  # bool: a meter was in service (the first ever window is not later)


class DistrictBalance:
    """The open days of one district; lives in a Bytewax stateful step, pickles.

    State: per meter, its windows of the open days (8 bytes of volume and pressure, 2 of
    flags each: about 2 KB a day) and its pattern (2 KB); the night history (1 KB).
    """

    __slots__ = (
        "district",
        "tz",
        "members",
        "lateness_windows",
        "assets",
        "origin_",
        "length_",
        "closed_",
        "pending_",
        "meters_",
        "night_",
    )

    def __init__(
        self,
        district: str,
        tz: str,
        members: frozenset[str] = frozenset(),
        lateness_s: int = 6 * 3600,
        assets: DistrictAssets | None = None,
    ) -> None:
        self.district = district
        self.tz = tz
        self.members = members  # the topology's meters and loggers of the district
        # Windows behind a meter's newest one that may still change (KPI lateness), plus one.
        self.lateness_windows = -(-lateness_s * 1_000_000 // WINDOW_US) + 1
        self.assets = assets
        self.origin_: int | None = None  # window of index 0: the start of the oldest open day
        self.length_ = 0  # windows held per meter
        self.closed_: int | None = None  # windows before it are closed
        self.pending_: int | None = None  # oldest window changed since the last rows
        self.meters_: dict[str, Meter] = {}
        self.night_ = NightFlow(district)

    # -- public API ------------------------------------------------------------------------

    def update(self, mw: MeterWindows) -> BalanceOutput:
        """Take a node's windows; rows of the periods they changed, and of the days closed."""
        window = mw.window
        if window.size == 0:
            return BalanceOutput()
        lo, hi = int(window.min()), int(window.max())
        volume, status, totalizer, pressure = mw.volume, mw.status, mw.totalizer, mw.pressure
        if self.closed_ is not None and lo < self.closed_:  # windows of closed days: ignored
            keep = window >= self.closed_
            window = window[keep]
            if window.size == 0:
                return BalanceOutput()
            lo, hi = int(window.min()), int(window.max())
            volume, status, totalizer, pressure = (
                volume[keep], status[keep], totalizer[keep], pressure[keep]
            )
        top = max((m.newest for m in self.meters_.values()), default=None)
        self._cover(lo, hi)
        assert self.origin_ is not None
        meter = self._meter(mw.node_id, mw.role)
        i = window - self.origin_
        meter.volume[i] = volume
        meter.status[i] = status
        meter.totalizer[i] = totalizer
        meter.pressure[i] = pressure
        meter.newest = max(meter.newest, hi)
        meter.first = lo if meter.first < 0 else min(meter.first, lo)
        meter.is_totalizer = meter.is_totalizer or bool(totalizer.any())
        if meter.is_totalizer:
            # The volume a totalizer carried over a gap is spread back over it: from the
            # window after the last one reported before ``lo``.
            reported = np.flatnonzero(meter.status[: lo - self.origin_] != MISSING)
            lo = self.origin_ + (int(reported[-1]) + 1 if reported.size else 0)
        self.pending_ = lo if self.pending_ is None else min(self.pending_, lo)
        closed = self._close(self._close_to())
        parts = [closed.rows] if closed.rows is not None else []
        # Rows of open periods once the newest meter enters a new hour: a live flow's many
        # small batches rewrite them once an hour, not once a batch.
        newest = meter.newest if top is None else max(top, meter.newest)
        if top is None or newest // WINDOWS_PER_HOUR > top // WINDOWS_PER_HOUR:
            if self.length_ and self.pending_ < self.origin_ + self.length_:
                parts.append(self._touched(max(self.pending_, self.origin_), newest))
            self.pending_ = None
        return BalanceOutput(_concat(parts), closed.events)

    def flush(self) -> BalanceOutput:
        """End of input: the final rows of every open day (on a copy: the state is kept)."""
        if not self.length_:
            return BalanceOutput()
        # On a copy of what closing changes: the night history always, the meters (patterns
        # learned, spreads settled) only when a day closes before the last one; the last day
        # teaches nothing (at the end of a 10 000-node replay, 1 000 districts flush at once,
        # most of them with one open day).
        assert self.origin_ is not None
        one_day = day_windows(self._day_of(self.origin_), self.tz)[1] >= (
            self.origin_ + self.length_
        )
        return self._copy(meters=not one_day)._close(None, final=True)

    def _copy(self, meters: bool) -> DistrictBalance:
        """A copy sharing the meters (their arrays too) unless ``meters``."""
        new = DistrictBalance.__new__(DistrictBalance)
        for name in DistrictBalance.__slots__:
            setattr(new, name, getattr(self, name))
        new.night_ = self.night_.copy()
        if meters:
            new.meters_ = {k: m.copy() for k, m in self.meters_.items()}
        return new

    # -- the span of open windows -------------------------------------------------------------

    def _day_of(self, window: int) -> int:
        return local_day(window, self.tz)

    def _cover(self, lo: int, hi: int) -> None:
        """Make the span reach from the start of ``lo``'s local day to ``hi``."""
        if self.origin_ is not None and lo >= self.origin_:
            before = 0  # the span starts at a local day's start: lo's day starts in it
        else:
            first = day_windows(self._day_of(lo), self.tz)[0]
            if self.origin_ is None:
                self.origin_ = first
            before = max(0, self.origin_ - first)
        after = max(0, hi + 1 - (self.origin_ + self.length_))
        if before or after:
            for m in self.meters_.values():
                _pad(m, before, after)
            self.origin_ -= before
            self.length_ += before + after

    def _meter(self, node_id: str, role: str) -> Meter:
        meter = self.meters_.get(node_id)
        if meter is None:
            n = self.length_
            meter = Meter(
                role, np.full(n, np.nan), np.zeros(n, np.int8), np.zeros(n, bool),
                np.full(n, np.nan),
            )
            self.meters_[node_id] = meter
        return meter

    def _close_to(self) -> int:
        """Windows before this are final for every meter (the district's watermark)."""
        newest = [m.newest for m in self.meters_.values()]
        cap = max(newest) - MAX_SPREAD_DAYS * WINDOWS_PER_DAY
        if not self.members <= self.meters_.keys():
            return cap  # a meter has not reported yet: it may still bring any recent day
        return max(min(newest) - self.lateness_windows, cap)

    def _close(self, close_to: int | None, final: bool = False) -> BalanceOutput:
        """Close the days whose windows are all before ``close_to`` (None: all), oldest first.

        ``final`` (None only): the state is thrown away after, so the last day neither teaches
        the patterns nor is dropped.
        """
        rows: list[TableRows] = []
        events: list[AnomalyEvent] = []
        while self.origin_ is not None and self.length_:
            end = min(day_windows(self._day_of(self.origin_), self.tz)[1],
                      self.origin_ + self.length_)
            if close_to is not None and end > close_to:
                break
            n = end - self.origin_
            c, estimates = self._estimates(0, n)
            day_rows, night = self._rows(self._series(estimates, c, 0, n), 0)
            rows.append(day_rows)
            if night is not None:
                events.extend(self.night_.commit(night))
            if final and n == self.length_:
                break
            self._learn(estimates, c, n)
            self._settle_spreads(estimates, n)
            self._drop(n)
            self.closed_ = end
        return BalanceOutput(_concat(rows), events)

    def _learn(self, estimates: dict[str, Estimate], day: Clock, n: int) -> None:
        """The closed day's whole measured hours, into each meter's pattern."""
        hours = hour_starts(day)
        for node_id, est in estimates.items():
            m = self.meters_[node_id]
            starts, volume = measured_hours(est.measured[:n], m.volume[:n], day, hours)
            if starts.size:
                m.profile.learn(day.how[starts], day.weekend[starts], day.hour[starts], volume)

    def _settle_spreads(self, estimates: dict[str, Estimate], n: int) -> None:
        """A gap's volume spread into the closing day stays there: the carrier keeps the rest.

        The rest is then spread over the open part of the gap by the pattern, as before (the
        pattern has learned the closed day meanwhile, so the weights may move a little).
        """
        for node_id, est in estimates.items():
            m = self.meters_[node_id]
            for start, end in est.spreads:
                if start < n <= end:
                    m.volume[end] -= float(est.volume[start:n].sum())

    def _drop(self, n: int) -> None:
        assert self.origin_ is not None
        for m in self.meters_.values():
            m.counted_before = m.counted_before or bool((m.status[:n] != MISSING).any())
            m.volume, m.status = m.volume[n:], m.status[n:]
            m.totalizer, m.pressure = m.totalizer[n:], m.pressure[n:]
        self.origin_ += n
        self.length_ -= n

    # -- rows ----------------------------------------------------------------------------------

    def _estimates(self, a: int, b: int) -> tuple[Clock, dict[str, Estimate]]:
        """The clock of span indices ``[a, b)`` and every balance meter's volumes over them.

        A meter's estimate of a window depends on no other window, but for a totalizer's
        spread gaps: a totalizer meter is estimated from the start of the span (spreads need
        what precedes) to the reading that carries a gap still open at ``b``, then cut to
        ``[a, b)``; its ``spreads`` count from the start of the span. (Estimating only what the
        rows need keeps closing day after day of a long span linear, not quadratic.)
        """
        assert self.origin_ is not None
        meters = [(node_id, m) for node_id, m in self.meters_.items() if m.role in BALANCE_ROLES]
        ends = {node_id: self._carried_to(m, b) for node_id, m in meters if m.is_totalizer}
        c = span_clock(self.origin_, max([b, *ends.values()]), self.tz)
        part = _slice_clock(c, a, b)
        estimates = {}
        for node_id, m in meters:
            since = 0 if m.counted_before else max(0, m.first - self.origin_)
            if m.is_totalizer:
                k = ends[node_id]
                est = estimate(
                    m.volume[:k], m.status[:k], m.totalizer[:k], m.profile, _slice_clock(c, 0, k),
                    is_totalizer=True, counted_before=m.counted_before, since=since,
                )
                estimates[node_id] = Estimate(
                    est.volume[a:b], est.filled[a:b], est.measured[a:b], est.spreads
                )
            else:
                estimates[node_id] = estimate(
                    m.volume[a:b], m.status[a:b], m.totalizer[a:b], m.profile, part,
                    is_totalizer=False, counted_before=m.counted_before,
                    since=max(0, since - a),
                )
        return part, estimates

    def _carried_to(self, m: Meter, b: int) -> int:
        """End of the windows a totalizer's estimate needs for its windows before ``b``."""
        if b >= self.length_:
            return self.length_
        # Windows without a totalizer reading count as missing (``estimate``).
        missing = (m.status[b - 1:] == MISSING) | ~m.totalizer[b - 1:]
        if not missing[0]:
            return b  # no gap open at b
        carrier = np.flatnonzero(~missing)
        return b - 1 + int(carrier[0]) + 1 if carrier.size else self.length_

    def _series(self, estimates: dict[str, Estimate], c: Clock, a: int, b: int) -> _Series:
        """District series over span indices ``[a, b)`` (the estimates' and ``c``'s)."""
        role = {r: np.zeros(b - a) for r in BALANCE_ROLES}
        seen = set()
        filled, metered = np.zeros(b - a), np.zeros(b - a)
        if estimates:
            # The meters' volumes as one matrix for the elementwise steps (one call each, not
            # one per meter); the sums still add meter after meter, in the same order.
            vol = np.array([est.volume for est in estimates.values()])
            known = nan_to_num(vol)
            by_pattern = np.where(np.array([est.filled for est in estimates.values()]),
                                  known, 0.0)
            for k, node_id in enumerate(estimates):
                r = self.meters_[node_id].role
                role[r] = role[r] + vol[k]
                seen.add(r)
                filled += by_pattern[k]
                metered += known[k]
        for r in ("inflow", "consumption"):
            if r not in seen:
                role[r] = np.full(b - a, np.nan)  # no meter: unknown, not zero
        loggers = [m for m in self.meters_.values() if m.role == "pressure"] or list(
            self.meters_.values()
        )
        p = np.array([m.pressure[a:b] for m in loggers])
        ok = np.isfinite(p)
        with np.errstate(invalid="ignore", divide="ignore"):
            pressure = np.where(ok, p, 0.0).sum(axis=0) / ok.sum(axis=0)
        assert self.origin_ is not None
        starts = [m.first for m in self.meters_.values() if m.role in BALANCE_ROLES]
        since = min(starts) if starts else self.origin_ + b
        if any(m.counted_before for m in self.meters_.values()):
            since = self.origin_
        active = self.origin_ + np.arange(a, b) >= since
        return _Series(c, role, filled, metered, pressure, active)

    def _touched(self, lo: int, hi: int) -> TableRows:
        """Rows of the open days holding windows ``[lo, hi]``: their hours from ``lo``'s on."""
        assert self.origin_ is not None
        a = max(0, day_windows(self._day_of(lo), self.tz)[0] - self.origin_)
        b = min(day_windows(self._day_of(hi), self.tz)[1] - self.origin_, self.length_)
        c, estimates = self._estimates(a, b)
        rows, _ = self._rows(self._series(estimates, c, a, b), lo - self.origin_ - a)
        return rows

    def _rows(self, s: _Series, hours_from: int) -> tuple[TableRows, Night | None]:
        """Rows of the series' hours (from the hour of window ``hours_from`` on) and days."""
        c = s.c
        size = c.day.size
        hour_idx = _group_starts(c.hour_start)
        day_idx = _group_starts(c.day)
        n_hours = hour_idx.size
        # Every balance column of the hours, then of the days, in one array each.
        sums = _aggregate(s, hour_idx, day_idx)
        hour_len_s = (np.concatenate((hour_idx[1:], [size])) - hour_idx) * (WINDOW_US / 1e6)
        hourly_lps = sums["system_input_m3"][:n_hours] * 1000.0 / hour_len_s
        hour_day, hour_of_day = c.day[hour_idx], c.hour[hour_idx]
        # The hours of a day are consecutive: day j's are [hour_bounds[j], hour_bounds[j + 1]).
        days_list = c.day[day_idx].tolist()
        hour_bounds = np.searchsorted(hour_day, days_list + [days_list[-1] + 1]).tolist()
        day_bounds = [*day_idx.tolist(), size]
        night_hour = _NIGHT_HOUR[hour_of_day]
        fixed_pressure = self.assets.pressure_m if self.assets is not None else None
        loss = sums["loss_m3"][n_hours:].tolist()
        night: Night | None = None
        extra = np.full((len(_DAY_COLUMNS), len(days_list)), np.nan)
        peak_hours: list[int | None] = []
        for j, d in enumerate(days_list):
            start = day_start_us(d, self.tz)
            h0, h1 = hour_bounds[j], hour_bounds[j + 1]
            day_lps = hourly_lps[h0:h1]
            mnf = _min(day_lps[night_hour[h0:h1]])
            night = self.night_.peek(
                self.night_.judge(d, start + NIGHT_HOURS[0] * US_PER_HOUR, mnf)
            )
            # np.nanargmax: the first highest hour, NaN hours left out.
            peak = (h0 + int(np.argmax(np.where(np.isnan(day_lps), -np.inf, day_lps)))
                    if np.isfinite(day_lps).any() else -1)
            peak_hours.append(int(hour_of_day[peak]) if peak >= 0 else None)
            if fixed_pressure is not None:
                pressure_m = fixed_pressure
            else:
                pressure_m = _mean(s.pressure[day_bounds[j]:day_bounds[j + 1]]) * BAR_TO_M
            day_h = (day_start_us(d + 1, self.tz) - start) / US_PER_HOUR
            extra[:, j] = (
                mnf, night.baseline, night.trend, night.leak_lps,
                float(hourly_lps[peak]) if peak >= 0 else float("nan"), pressure_m,
                ili(loss[j], day_h, self.assets, pressure_m),
            )
        keep = c.hour_start[hour_idx] >= c.hour_start[min(hours_from, size - 1)]
        # No rows for periods before any meter was in service.
        keep &= np.logical_or.reduceat(s.active, hour_idx)
        keep_day = np.logical_or.reduceat(s.active, day_idx)
        n_h, n_d = np.count_nonzero(keep), np.count_nonzero(keep_day)
        kept = np.concatenate((keep, keep_day))
        starts = [*c.hour_start[hour_idx][keep].tolist(),
                  *(day_start_us(d, self.tz) for d, k in zip(days_list, keep_day.tolist(),
                                                              strict=True) if k)]
        cols: dict[str, object] = {
            "district": [self.district] * (n_h + n_d),
            "period": ["hour"] * n_h + ["day"] * n_d,
            "period_start": np.array(starts, dtype=np.int64).astype("datetime64[us]"),
            "peak_hour": [None] * n_h + [p for p, k in zip(
                peak_hours, keep_day.tolist(), strict=True) if k],
        }
        for key, values in sums.items():
            cols[key] = values[kept]
        by_day = np.full((len(_DAY_COLUMNS), n_h + n_d), np.nan)
        by_day[:, n_h:] = extra[:, keep_day]
        for k, key in enumerate(_DAY_COLUMNS):
            cols[key] = by_day[k]
        share = np.asarray(cols["filled_share"])
        cols["estimated"] = np.where(np.isnan(share), False, share > ESTIMATED_SHARE)
        return frame("district_balance", cols), night


#: Day-only columns, in the order ``_rows`` computes them.
_DAY_COLUMNS = ("mnf_lps", "mnf_baseline_lps", "mnf_trend_lps_per_day", "leak_lps", "peak_lps",
                "pressure_m", "ili")
#: Local hours (0-23) of the night window.
_NIGHT_HOUR = np.isin(np.arange(24), NIGHT_HOURS)


def _slice_clock(c: Clock, a: int, b: int) -> Clock:
    return Clock(c.day[a:b], c.hour[a:b], c.weekend[a:b], c.how[a:b], c.hour_start[a:b])


def _group_starts(key: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))


def _aggregate(s: _Series, *starts: np.ndarray) -> dict[str, np.ndarray]:
    """Balance columns per group of windows, groups starting at each of ``starts`` in turn."""
    series = np.array((s.role["inflow"], s.role["outflow"], s.role["consumption"], s.metered,
                       s.filled))
    # NaN (unknown) in any window makes the group NaN. Summed row by row as one array: the
    # same sums, bit for bit, as a reduceat per series.
    inflow, outflow, consumption, metered, filled = np.concatenate(
        [np.add.reduceat(series, idx, axis=1) for idx in starts], axis=1
    )
    system_input = inflow - outflow
    loss = system_input - consumption
    with np.errstate(invalid="ignore", divide="ignore"):
        nrw = np.where(system_input > 0, loss / system_input, np.nan)
        share = np.where(metered > 0, filled / metered, np.nan)
    return {
        "inflow_m3": inflow,
        "consumption_m3": consumption,
        "loss_m3": loss,
        "nrw": nrw,
        "outflow_m3": outflow,
        "system_input_m3": system_input,
        "filled_share": share,
    }


def _mean(x: np.ndarray) -> float:
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _min(x: np.ndarray) -> float:
    ok = np.isfinite(x)
    return float(x[ok].min()) if ok.any() else float("nan")


def _pad(m: Meter, before: int, after: int) -> None:
    def grow(a: np.ndarray, fill: object) -> np.ndarray:
        out = np.empty(before + a.size + after, a.dtype)
        out[:before] = fill
        out[before : before + a.size] = a
        out[before + a.size :] = fill
        return out

    m.volume, m.pressure = grow(m.volume, np.nan), grow(m.pressure, np.nan)
    m.status, m.totalizer = grow(m.status, MISSING), grow(m.totalizer, False)


def _concat(parts: list[TableRows]) -> TableRows | None:
    return concat_rows(parts) if parts else None


def district_windows(
    network: Network, node_id: str, kpi_15m: TableRows | None
) -> tuple[str, MeterWindows] | None:
    """A member node's judged windows keyed by its district (None for other nodes)."""
    spec = network.nodes.get(node_id)
    if kpi_15m is None or spec is None or spec.district is None:
        return None
    if spec.role not in MEMBER_ROLES:
        return None
    return spec.district, meter_windows(node_id, spec.role, kpi_15m)


def new_balance(settings: Settings, district: str) -> DistrictBalance:
    """A district's balance with its members, lateness and assets from the settings."""
    network = settings.network
    members = frozenset(
        spec.node_id for spec in network.district_nodes(district) if spec.role in MEMBER_ROLES
    )
    return DistrictBalance(
        district, settings.tz, members, settings.allowed_lateness_s, network.assets.get(district)
    )
