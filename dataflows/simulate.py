"""A synthetic water network with labelled incidents, for demos, tests and evaluation.

``simulate()`` writes three files into a folder:

- ``readings.csv``: canonical long CSV (shared/FORMATS.md section 1), timestamps in UTC with
  ``Z``, rows sorted by time then node as a telemetry export would be. The faults a real
  export carries are in it on purpose: gaps, frozen values, single-reading spikes, a clock
  that runs off for a while, exact and conflicting duplicates.
- ``labels.csv``: every injected event, ``node_id,measurement,kind,start,end,detail``, with
  ``start``/``end`` the first and last affected reading instants (inclusive, ISO-8601 UTC).
  An empty ``measurement`` means the event concerns the whole reading (gap, clock skew,
  duplicate). Kinds: ``leak``, ``burst``, ``stuck``, ``spike`` (what an anomaly detector is
  scored against) and ``gap``, ``clock_skew``, ``duplicate``, ``conflict`` (what validation
  must handle).
- ``network.toml``: districts and nodes in the format of ``dataflows.topology``.
- ``balance_truth.csv``: the true volumes per district and local day, before meter noise:
  ``district,day,inflow_m3,consumption_m3,loss_m3`` (the losses are the unmetered ones:
  background leakage and ``district_leaks``), what a water balance is checked against.

The physics is simple but consistent, so KPIs make sense on the output: each consumption
node follows a diurnal and weekly demand pattern in local time; a district's inflow is the sum
of its consumption plus pressure-dependent background leakage plus injected leaks and bursts;
pressure falls with the square of district demand (head loss); the inflow totalizer is the
integral of the metered inflow; a tank buffers the district's daily demand swing.

Everything is vectorized over (node, time) arrays and written by polars, so a million
readings take seconds. The output depends only on the arguments: same seed, same bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from dataflows.model import MEASUREMENTS

__all__ = ["SimulationResult", "simulate", "main"]

#: District names and approximate centres in and around Cagliari (lat, lon).
_DISTRICTS: tuple[tuple[str, float, float], ...] = (
    ("Castello", 39.2195, 9.1150),
    ("Pirri", 39.2530, 9.1370),
    ("Villanova", 39.2180, 9.1230),
    ("Is Mirrionis", 39.2330, 9.1060),
    ("San Benedetto", 39.2240, 9.1250),
    ("Selargius", 39.2540, 9.1630),
    ("Bonaria", 39.2100, 9.1300),
    ("Monserrato", 39.2600, 9.1440),
    ("Sant'Avendrace", 39.2300, 9.0950),
    ("Genneruxi", 39.2330, 9.1300),
    ("Stampace", 39.2170, 9.1090),
    ("La Palma", 39.2250, 9.1450),
    ("Fonsarda", 39.2280, 9.1260),
    ("Quartucciu", 39.2530, 9.1780),
    ("Marina", 39.2150, 9.1120),
    ("Is Bingias", 39.2450, 9.1200),
)

#: Number of decimals written per measurement: what real meters report, and it keeps the
#: file small.
_DECIMALS: dict[str, int] = {
    "flow_rate": 3,
    "pressure": 3,
    "temperature": 2,
    "total_flow": 3,
    "level": 3,
    "chlorine": 3,
    "ph": 2,
    "turbidity": 3,
    "conductivity": 1,
    "redox": 1,
}

#: Measurements each role reports (the others are empty cells).
_ROLE_MEASUREMENTS: dict[str, tuple[str, ...]] = {
    "inflow": ("flow_rate", "pressure", "total_flow"),
    "consumption": ("flow_rate", "pressure"),
    "tank": ("level",),
    "pressure": ("pressure",),
    "quality": ("chlorine", "ph", "turbidity", "conductivity", "temperature"),
}

_TANK_HEIGHT_M = 6.0
_US = 1_000_000


@dataclass(frozen=True)
class SimulationResult:
    """Where ``simulate()`` wrote its files and how much it wrote."""

    readings_path: Path
    labels_path: Path
    network_path: Path
    n_readings: int
    n_nodes: int
    truth_path: Path


@dataclass(frozen=True)
class _Node:
    node_id: str
    name: str
    district: int  # index into the district list
    role: str
    lat: float
    lon: float


def _layout(districts: int, nodes_per_district: int, rng: np.random.Generator) -> list[_Node]:
    """Nodes of every district: inflow, tank, pressure logger, quality probe, consumption.

    A quality probe is added when a district has room for it (six nodes or more) so that
    small networks keep at least two consumption meters for the water balance.
    """
    nodes: list[_Node] = []
    for d in range(districts):
        if d < len(_DISTRICTS):
            dname, clat, clon = _DISTRICTS[d]
        else:
            # More districts than named ones: spread the rest over a grid in the same area.
            k = d - len(_DISTRICTS)
            dname = f"District {d + 1}"
            clat = 39.205 + 0.012 * (k % 8)
            clon = 9.085 + 0.012 * ((k // 8) % 9)
        did = f"d{d + 1}"
        quality = nodes_per_district >= 6
        n_cons = nodes_per_district - 3 - int(quality)
        members = [("inflow", f"{did}-inflow", f"{dname} inflow meter")]
        members.append(("tank", f"{did}-tank", f"{dname} tank"))
        members.append(("pressure", f"{did}-p01", f"{dname} critical-point pressure logger"))
        if quality:
            members.append(("quality", f"{did}-q01", f"{dname} water quality probe"))
        members += [
            ("consumption", f"{did}-c{i + 1:02d}", f"{dname} consumption meter {i + 1}")
            for i in range(n_cons)
        ]
        jitter = rng.uniform(-0.006, 0.006, size=(len(members), 2))
        for (role, nid, name), (jlat, jlon) in zip(members, jitter, strict=True):
            nodes.append(_Node(nid, name, d, role, round(clat + jlat, 5), round(clon + jlon, 5)))
    return nodes


def _start_utc_us(start: str, tz: str) -> int:
    """The first instant: ``start`` as local time in ``tz`` (a date means local midnight)."""
    zone = ZoneInfo(tz)
    try:
        dt = datetime.fromisoformat(start)
    except ValueError:
        d = date.fromisoformat(start)
        dt = datetime(d.year, d.month, d.day, tzinfo=zone)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=zone)
    return int(dt.timestamp()) * _US


def _gauss(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A bump around ``centre`` hours on the 24-hour circle."""
    d = (h - centre + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (d / width) ** 2)


def _pattern(h: np.ndarray, weekend: np.ndarray) -> np.ndarray:
    """Household demand relative to its weekly mean, by local hour and day type.

    Weekdays peak at 07:30 and 20:00; weekends start later (peak near 10:00) with a lunch
    peak. Both reach their minimum around 03:00, which is what minimum-night-flow analysis
    relies on.
    """

    def raw(hh: np.ndarray, we: np.ndarray) -> np.ndarray:
        weekday = (
            0.33
            + 1.15 * _gauss(hh, 7.5, 1.3)
            + 0.55 * _gauss(hh, 13.0, 1.6)
            + 0.85 * _gauss(hh, 20.2, 1.9)
        )
        weekend_ = (
            0.36
            + 0.95 * _gauss(hh, 10.0, 1.9)
            + 0.70 * _gauss(hh, 13.5, 1.5)
            + 0.75 * _gauss(hh, 20.5, 1.9)
        )
        return np.where(we, weekend_, weekday)

    # Normalise over a fixed reference week so that the scale of a node is its mean flow.
    grid = np.arange(0.0, 24.0, 0.05)
    mean = (
        5 * raw(grid, np.zeros_like(grid, bool)).mean()
        + 2 * raw(grid, np.ones_like(grid, bool)).mean()
    ) / 7
    return raw(h, weekend) / mean


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], window: int) -> np.ndarray:
    """Unit-variance noise correlated over ``window`` steps (moving average of white noise)."""
    n, t = shape
    w = max(1, window)
    white = rng.standard_normal((n, t + w))
    c = np.cumsum(white, axis=1)
    ma = (c[:, w:] - c[:, :-w]) / np.sqrt(w)
    return ma


class _Placer:
    """Places non-overlapping incidents on a node's timeline, seeded, with a margin."""

    def __init__(self, n_nodes: int, n_steps: int, margin: int) -> None:
        self.busy = np.zeros((n_nodes, n_steps), dtype=bool)
        self.margin = margin
        self.n_steps = n_steps

    def place(
        self,
        rng: np.random.Generator,
        candidates: list[int],
        length: int,
        also: list[int] | None = None,
        margin: int | None = None,
    ) -> tuple[int, int, int] | None:
        """(node, first step, last step) of a free window, marked busy; None if none found.

        ``also`` lists other nodes the incident shows on, such as the district inflow of a
        burst: they must be free in that window too, so one label never hides another.
        ``margin`` (steps kept free on both sides) overrides the default one.
        """
        margin = self.margin if margin is None else margin
        length = max(1, min(length, self.n_steps // 3))
        if not candidates or self.n_steps <= length + 2:
            return None
        for _ in range(60):
            node = candidates[int(rng.integers(len(candidates)))]
            s = int(rng.integers(1, self.n_steps - length))
            e = s + length - 1
            lo, hi = max(0, s - margin), min(self.n_steps, e + 1 + margin)
            check = [node] + (also or [])
            if not self.busy[check, lo:hi].any():
                self.busy[check, s : e + 1] = True
                return node, s, e
        return None


def simulate(
    out_dir: Path,
    *,
    districts: int = 2,
    nodes_per_district: int = 5,
    days: int = 14,
    step_s: int = 300,
    start: str = "2024-11-04",
    seed: int = 42,
    events: bool = True,
    tz: str = "Europe/Rome",
    district_leaks: tuple[tuple[str, float, float], ...] = (),
) -> SimulationResult:
    """Write a synthetic network's readings, event labels and topology into ``out_dir``.

    Each district has an inflow meter, a tank, a pressure logger at its critical point, a
    water-quality probe when ``nodes_per_district >= 6``, and consumption meters for the
    rest (at least one: ``nodes_per_district >= 4``). With ``events`` the incidents listed in
    the module docstring are injected at random (seeded) times and written to the labels.
    ``district_leaks`` adds unmetered leaks (real losses: the inflow sees them, no consumption
    meter does), each ``(district id, start in days from the first instant, L/s)``, labelled
    ``leak`` on the district's inflow meter; they draw no random numbers, so the rest of the
    output is the same with or without them.
    """
    if districts < 1 or nodes_per_district < 4 or days < 1:
        raise ValueError("need districts >= 1, nodes_per_district >= 4 and days >= 1")
    if step_s < 1 or step_s > 3600:
        raise ValueError("step_s must be between 1 and 3600 seconds")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    nodes = _layout(districts, nodes_per_district, rng)
    n = len(nodes)
    n_steps = days * 86400 // step_s
    step_us = step_s * _US
    t0 = _start_utc_us(start, tz)
    grid = t0 + np.arange(n_steps, dtype=np.int64) * step_us
    per_hour = 3600.0 / step_s

    # Local calendar of every step: DST-aware through polars' time-zone database.
    local = pl.Series(grid).cast(pl.Datetime("us", "UTC")).dt.convert_time_zone(tz)
    hour = (
        local.dt.hour().to_numpy().astype(np.float64)
        + local.dt.minute().to_numpy() / 60.0
        + local.dt.second().to_numpy() / 3600.0
    )
    weekend = local.dt.weekday().to_numpy() >= 6
    day_no = local.dt.date().cast(pl.Int32).to_numpy()
    day_idx = day_no - day_no[0]
    n_days_local = int(day_idx[-1]) + 1
    pattern = _pattern(hour, weekend)  # (T,)

    roles = np.array([nd.role for nd in nodes])
    dist = np.array([nd.district for nd in nodes])
    cons = np.flatnonzero(roles == "consumption")
    inflow_of = {
        int(d): int(np.flatnonzero((roles == "inflow") & (dist == d))[0]) for d in range(districts)
    }

    # Demand of consumption nodes (L/s): pattern x node scale x day factor x smooth noise.
    scale = np.zeros(n)
    scale[cons] = np.round(rng.lognormal(np.log(3.0), 0.45, size=cons.size), 2)
    day_factor = 1.0 + 0.04 * rng.standard_normal((n, n_days_local))
    noise = 1.0 + 0.06 * _smooth_noise(rng, (n, n_steps), max(1, int(round(per_hour / 2))))
    demand = scale[:, None] * pattern[None, :] * day_factor[:, day_idx] * noise
    demand = np.maximum(demand, 0.0)
    demand[roles != "consumption"] = 0.0

    onehot = np.zeros((districts, n))
    onehot[dist, np.arange(n)] = 1.0
    district_demand = onehot @ demand  # (D, T)
    district_mean = district_demand.mean(axis=1, keepdims=True)
    ratio = district_demand / district_mean  # 1 on average

    # Pressure model (bar): static head minus a head loss growing with district flow^1.85.
    p0 = np.zeros(n)
    hl = np.zeros(n)
    for i, nd in enumerate(nodes):
        if nd.role == "inflow":
            p0[i], hl[i] = rng.uniform(5.0, 5.8), rng.uniform(0.06, 0.10)
        elif nd.role == "consumption":
            p0[i], hl[i] = rng.uniform(3.6, 4.8), rng.uniform(0.22, 0.32)
        elif nd.role == "pressure":
            p0[i], hl[i] = rng.uniform(2.9, 3.3), rng.uniform(0.30, 0.38)

    # Background leakage: 8-15 % of the district's mean demand, higher when pressure is
    # higher (FAVAD exponent ~1), hence highest at night as real leakage is.
    leak_share = rng.uniform(0.08, 0.15, size=districts)
    p_avg = np.maximum(1.0 - 0.2 * ratio**1.85, 0.3)  # relative network pressure, ~1 at night
    background = leak_share[:, None] * district_mean * p_avg / p_avg.mean(axis=1, keepdims=True)

    extra = np.zeros((n, n_steps))  # leak and burst flow at a consumption node (L/s)
    p_drop = np.zeros((n, n_steps))  # local pressure drop from a burst (bar)
    labels: list[tuple[str, str, str, int, int, str]] = []
    placer = _Placer(n, n_steps, margin=max(1, int(per_hour * 2)))
    inflows = sorted(inflow_of.values())
    node_days = n * days

    if events:
        # Leaks: one per consumption node at most, starting between 15 % and 70 % of the
        # horizon so there are nights before and after; some are repaired after 1-4 days.
        n_leak = min(cons.size, math.ceil(districts * days / 10))
        night = _pattern(np.array([3.0]), np.array([False]))[0]
        for node in rng.permutation(cons)[:n_leak]:
            node = int(node)
            s = int(
                rng.integers(int(0.15 * n_steps), max(int(0.15 * n_steps) + 1, int(0.70 * n_steps)))
            )
            e = n_steps - 1
            repaired = rng.random() < 0.4
            if repaired:
                e = min(n_steps - 1, s + int(rng.uniform(1, 4) * 24 * per_hour))
            frac = rng.uniform(0.2, 0.6)
            q = round(float(frac * scale[node] * night), 3)
            extra[node, s : e + 1] += q  # the inflow sees it through the district sum
            inflow = inflow_of[int(dist[node])]
            end = "repaired" if repaired and e < n_steps - 1 else "until the end"
            detail = f"+{q} L/s ({frac:.0%} of night flow), {end}"
            labels.append((nodes[node].node_id, "flow_rate", "leak", s, e, detail))
            labels.append(
                (
                    nodes[inflow].node_id,
                    "flow_rate",
                    "leak",
                    s,
                    e,
                    f"+{q} L/s from a leak at {nodes[node].node_id}, {end}",
                )
            )

        # Bursts: a sudden large flow at a consumption node for 1-6 h, with a local
        # pressure drop; the district inflow sees the flow, the district the pressure fall.
        n_burst = math.ceil(node_days / 40)
        for _ in range(n_burst):
            length = int(rng.uniform(1, 6) * per_hour)
            d_try = int(rng.integers(districts))
            cand = [int(c) for c in cons if dist[c] == d_try]
            got = placer.place(rng, cand, length, also=[inflow_of[d_try]])
            if got is None:
                continue
            node, s, e = got
            # One and a half to three times the node's mean flow (a large, sudden rise), but
            # at most the district's mean flow so the network keeps its pressure.
            q = round(
                float(min(rng.uniform(1.5, 3.0) * scale[node], 1.0 * district_mean[d_try, 0])), 3
            )
            drop = round(float(rng.uniform(0.5, 1.2)), 3)
            extra[node, s : e + 1] += q
            p_drop[node, s : e + 1] += drop
            nid = nodes[node].node_id
            labels.append((nid, "flow_rate", "burst", s, e, f"+{q} L/s"))
            labels.append((nid, "pressure", "burst", s, e, f"-{drop} bar locally"))
            labels.append(
                (
                    nodes[inflow_of[d_try]].node_id,
                    "flow_rate",
                    "burst",
                    s,
                    e,
                    f"+{q} L/s from a burst at {nid}",
                )
            )

    for did, start_day, rate in district_leaks:
        d = int(did.removeprefix("d")) - 1
        if not 0 <= d < districts:
            raise ValueError(f"district_leaks: no district {did!r} in d1..d{districts}")
        s = min(n_steps - 1, max(0, int(round(start_day * 86400 / step_s))))
        background[d, s:] += rate
        labels.append(
            (nodes[inflow_of[d]].node_id, "flow_rate", "leak", s, n_steps - 1,
             f"+{rate} L/s unmetered district leak, until the end")
        )

    # Totals and pressures with the incidents in.
    inflow_true = background + onehot @ extra + district_demand  # (D, T)
    flow = demand + extra
    for d, i in inflow_of.items():
        flow[i] = inflow_true[d]
    flow_ratio = (onehot @ (demand + extra)) / district_mean
    pressure_clean = p0[:, None] - hl[:, None] * flow_ratio[dist] ** 1.85 - p_drop
    base_pressure = p0[:, None] - hl[:, None] * ratio[dist] ** 1.85

    if events:
        # A burst lowers pressure everywhere in its district: label the nodes where the fall
        # is large enough for a detector to notice, so it is not scored as a false alarm.
        for nid, meas, kind, s, e, _detail in list(labels):
            if kind != "burst" or meas != "pressure":
                continue
            d = next(nd.district for nd in nodes if nd.node_id == nid)
            for i in map(int, np.flatnonzero((dist == d) & (hl > 0))):
                if nodes[i].node_id == nid:
                    continue
                fall = float(np.max(base_pressure[i, s : e + 1] - pressure_clean[i, s : e + 1]))
                if fall >= 0.25:
                    placer.busy[i, s : e + 1] = True  # no sensor fault inside this label
                    labels.append(
                        (
                            nodes[i].node_id,
                            "pressure",
                            "burst",
                            s,
                            e,
                            f"-{fall:.2f} bar from a burst at {nid}",
                        )
                    )

    cols: dict[str, np.ndarray] = {}
    is_flow = (roles == "inflow") | (roles == "consumption")
    meter = flow * (1.0 + 0.015 * rng.standard_normal((n, n_steps)))
    meter += 0.02 * rng.standard_normal((n, n_steps))
    meter = np.maximum(meter, 0.0)
    cols["flow_rate"] = np.where(is_flow[:, None], meter, np.nan)
    has_p = hl > 0
    pres = pressure_clean + 0.02 * rng.standard_normal((n, n_steps))
    cols["pressure"] = np.where(has_p[:, None], np.maximum(pres, 0.05), np.nan)

    # Inflow totalizer: starts at a plausible reading and integrates the metered flow.
    total = np.full((n, n_steps), np.nan)
    for i in inflows:
        start_m3 = float(np.round(rng.uniform(10_000, 900_000), 1))
        vol = meter[i] * step_s / 1000.0
        total[i] = start_m3 + np.concatenate(([0.0], np.cumsum(vol[:-1])))
    cols["total_flow"] = total

    # Tank level: fills when demand is below the day's mean, empties at the peaks.
    level = np.full((n, n_steps), np.nan)
    dev = (
        district_demand
        - (
            np.stack([np.bincount(day_idx, weights=row) for row in district_demand])
            / np.bincount(day_idx)
        )[:, day_idx]
    )
    for i in map(int, np.flatnonzero(roles == "tank")):
        d = int(dist[i])
        area = float(district_mean[d, 0]) * rng.uniform(10.0, 14.0)  # m2, ~1 m daily swing
        cum = np.cumsum(dev[d] * step_s / 1000.0)  # m3 drawn above the daily mean
        # Re-zeroed at each local midnight: the tank is back at its set point every day.
        day_start = np.concatenate(([0], np.flatnonzero(np.diff(day_idx)) + 1))
        cum_day = cum - np.concatenate(([0.0], cum))[day_start][day_idx]
        set_point = rng.uniform(3.2, 3.8)
        lv = set_point - cum_day / area + 0.005 * rng.standard_normal(n_steps)
        level[i] = np.clip(lv, 0.3, _TANK_HEIGHT_M - 0.2)
    cols["level"] = level

    # Quality probes: chlorine decays with water age (low demand = older water), pH and
    # conductivity wander slowly, turbidity is low with rare small peaks, water cools in
    # November by a few tenths of a degree a week.
    qual = np.flatnonzero(roles == "quality")
    for name in ("chlorine", "ph", "turbidity", "conductivity", "temperature"):
        cols[name] = np.full((n, n_steps), np.nan)
    days_f = np.arange(n_steps) * step_s / 86400.0
    for i in map(int, qual):
        d = int(dist[i])
        r = ratio[d]
        slow = _smooth_noise(rng, (1, n_steps), int(per_hour * 12))[0]
        c0 = rng.uniform(0.35, 0.55)
        cols["chlorine"][i] = c0 * (0.72 + 0.28 * np.tanh(r)) + 0.008 * rng.standard_normal(n_steps)
        cols["ph"][i] = rng.uniform(7.3, 7.7) + 0.02 * slow + 0.015 * rng.standard_normal(n_steps)
        cols["turbidity"][i] = (0.15 + 0.08 * np.maximum(r - 1.0, 0.0)) * rng.lognormal(
            0.0, 0.15, n_steps
        )
        cols["conductivity"][i] = (
            rng.uniform(600, 850) + 8.0 * slow + 2.0 * rng.standard_normal(n_steps)
        )
        cols["temperature"][i] = (
            rng.uniform(16.5, 18.5)
            - 0.04 * days_f
            + 0.25 * np.sin(2 * np.pi * (hour - 9) / 24)
            + 0.03 * rng.standard_normal(n_steps)
        )

    # Sensor and export faults, on top of the physics.
    skew = np.zeros((n, n_steps), dtype=np.int64)
    keep = np.ones((n, n_steps), dtype=bool)
    dup_rows: list[tuple[int, int, str | None, float]] = []  # node, step, changed col, value
    all_nodes = list(range(n))

    def measured(i: int) -> tuple[str, ...]:
        return _ROLE_MEASUREMENTS[nodes[i].role]

    if events:
        for _ in range(math.ceil(node_days / 30)):  # stuck: a value frozen for 8-24 h
            got = placer.place(rng, all_nodes, int(rng.uniform(8, 24) * per_hour))
            if got is None:
                continue
            i, s, e = got
            m = [x for x in measured(i) if x != "total_flow"]
            meas = m[int(rng.integers(len(m)))]
            frozen = cols[meas][i, s - 1]
            cols[meas][i, s : e + 1] = frozen
            labels.append(
                (
                    nodes[i].node_id,
                    meas,
                    "stuck",
                    s,
                    e,
                    f"frozen at {round(float(frozen), _DECIMALS[meas])}",
                )
            )

        for _ in range(math.ceil(node_days / 6)):  # spike: one reading far off
            got = placer.place(rng, all_nodes, 1)
            if got is None:
                continue
            i, s, _e = got
            m = [x for x in measured(i) if x != "total_flow"]
            meas = m[int(rng.integers(len(m)))]
            v = float(cols[meas][i, s])
            up = rng.random() < 0.7
            if meas == "flow_rate":
                nv = v * rng.uniform(2.5, 4.0) + rng.uniform(2.0, 5.0) if up else 0.0
            elif meas == "pressure":
                nv = (
                    min(v + rng.uniform(1.5, 3.0), 9.5)
                    if up
                    else max(0.1, v - rng.uniform(1.5, 2.5))
                )
            elif meas == "level":
                nv = float(
                    np.clip(
                        v + (1 if up else -1) * rng.uniform(1.2, 2.0), 0.1, _TANK_HEIGHT_M - 0.1
                    )
                )
            elif meas == "chlorine":
                nv = v * rng.uniform(2.5, 3.5) if up else 0.0
            elif meas == "ph":
                nv = v + (1 if up else -1) * rng.uniform(1.0, 1.8)
            elif meas == "turbidity":
                nv = v + rng.uniform(4.0, 15.0)
            elif meas == "conductivity":
                nv = v * (rng.uniform(1.4, 1.8) if up else rng.uniform(0.4, 0.6))
            else:  # temperature
                nv = v + (1 if up else -1) * rng.uniform(6.0, 10.0)
            cols[meas][i, s] = nv
            labels.append(
                (
                    nodes[i].node_id,
                    meas,
                    "spike",
                    s,
                    s,
                    f"{round(nv, _DECIMALS[meas])} instead of {round(v, _DECIMALS[meas])}",
                )
            )

        for _ in range(math.ceil(node_days / 30)):  # gap: no readings for 2-12 h
            got = placer.place(rng, all_nodes, int(rng.uniform(2, 12) * per_hour))
            if got is None:
                continue
            i, s, e = got
            keep[i, s : e + 1] = False
            labels.append((nodes[i].node_id, "", "gap", s, e, f"{e - s + 1} readings missing"))

        for _ in range(math.ceil(node_days / 60)):  # clock skew for 6-48 h
            off = int(rng.integers(2, 181)) * 60 * (1 if rng.random() < 0.6 else -1)
            if off % step_s == 0:
                # Off the reading grid, so the shifted readings never collide with true ones.
                off += max(1, step_s // 2)
            # The shifted readings must not land in another incident's window of the node.
            reach = placer.margin + math.ceil(abs(off) / step_s)
            length = int(rng.uniform(6, 48) * per_hour)
            got = placer.place(rng, all_nodes, length, margin=reach)
            if got is None:
                continue
            i, s, e = got
            skew[i, s : e + 1] = off * _US
            labels.append(
                (nodes[i].node_id, "", "clock_skew", s, e, f"timestamps shifted by {off:+d} s")
            )

        # Duplicates: exact copies of readings untouched by any other incident, and a few
        # conflicting ones (same node and instant, one value different).
        free = np.flatnonzero(~placer.busy.ravel())
        n_dup = math.ceil(n * n_steps * 0.001)
        n_conf = math.ceil(n_dup / 8)
        picks = rng.choice(free, size=min(free.size, n_dup + n_conf), replace=False)
        for k, flat in enumerate(np.sort(picks)):
            i, s = divmod(int(flat), n_steps)
            if k % 9 == 8:  # every ninth pick is a conflict, spread over the whole period
                meas = measured(i)[0]
                v = float(cols[meas][i, s])
                nv = v * 1.1 + 0.05
                dup_rows.append((i, s, meas, nv))
                labels.append(
                    (
                        nodes[i].node_id,
                        meas,
                        "conflict",
                        s,
                        s,
                        f"a second reading with {round(nv, _DECIMALS[meas])} instead of "
                        f"{round(v, _DECIMALS[meas])}",
                    )
                )
            else:
                dup_rows.append((i, s, None, 0.0))
                labels.append((nodes[i].node_id, "", "duplicate", s, s, "exact copy"))

    # Rows: every kept (step, node), plus the duplicates, in export order.
    base = np.flatnonzero(keep.T.ravel())  # time-major flat index: step * n + node
    dup_idx = np.array([s * n + i for i, s, _m, _v in dup_rows], dtype=np.int64)
    rows = np.concatenate((base, dup_idx))
    is_dup = np.concatenate((np.zeros(base.size, np.int8), np.ones(dup_idx.size, np.int8)))
    row_step, row_node = np.divmod(rows, n)
    ts = grid[row_step] + skew[row_node, row_step]
    rank = np.argsort(np.argsort(np.array([nd.node_id for nd in nodes])))
    order = np.lexsort((is_dup, rank[row_node], ts))

    data: dict[str, pl.Series] = {}
    ids = np.array([nd.node_id for nd in nodes])
    data["node_id"] = pl.Series("node_id", ids[row_node[order]])
    data["timestamp"] = pl.Series("timestamp", ts[order]).cast(pl.Datetime("us", "UTC"))
    for meas in MEASUREMENTS:
        if meas not in cols:
            data[meas] = pl.Series(meas, np.full(rows.size, None), dtype=pl.Float64)
            continue
        arr = cols[meas]
        column = arr.T.ravel()[rows]
        for k, (_i, _s, changed, new_value) in enumerate(dup_rows):
            if changed == meas:  # the conflicting copy differs in this measurement
                column[base.size + k] = new_value
        column = np.round(column, _DECIMALS[meas])
        data[meas] = pl.Series(meas, column[order], nan_to_null=True)
    frame = pl.DataFrame(data)

    readings_path = out_dir / "readings.csv"
    frame.write_csv(readings_path, datetime_format="%Y-%m-%dT%H:%M:%SZ")

    labels_path = out_dir / "labels.csv"
    _write_labels(labels_path, labels, grid)
    network_path = out_dir / "network.toml"
    network_path.write_text(_network_toml(nodes, scale, districts, seed), encoding="utf-8")
    truth_path = out_dir / "balance_truth.csv"
    _write_truth(truth_path, inflow_true, onehot @ (demand + extra), day_no, step_s)
    return SimulationResult(
        readings_path, labels_path, network_path, int(rows.size), n, truth_path
    )


def _write_truth(
    path: Path, inflow: np.ndarray, consumption: np.ndarray, day_no: np.ndarray, step_s: int
) -> None:
    """True volumes (m3) per district and local day: inflow, metered consumption, losses."""
    days, index = np.unique(day_no, return_inverse=True)
    m3 = step_s / 1000.0

    def daily(flow: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(index, weights=row) * m3 for row in flow])

    vin, vcons = daily(inflow), daily(consumption)
    n_d = inflow.shape[0]
    pl.DataFrame(
        {
            "district": [f"d{d + 1}" for d in range(n_d) for _ in days],
            "day": pl.Series(np.tile(days, n_d)).cast(pl.Int32).cast(pl.Date),
            "inflow_m3": vin.ravel(),
            "consumption_m3": vcons.ravel(),
            "loss_m3": (vin - vcons).ravel(),
        }
    ).write_csv(path)


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / _US, ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_labels(
    path: Path, labels: list[tuple[str, str, str, int, int, str]], grid: np.ndarray
) -> None:
    """Labels in time order.

    Instants are the true reading instants: a clock-skew label says when the clock was
    wrong, not what the wrong clock wrote.
    """
    rows = sorted(labels, key=lambda r: (r[3], r[0], r[1], r[2]))
    frame = pl.DataFrame(
        {
            "node_id": [r[0] for r in rows],
            # None, not "": polars writes an empty cell for it, as the canonical CSV does.
            "measurement": [r[1] or None for r in rows],
            "kind": [r[2] for r in rows],
            "start": [_iso(int(grid[r[3]])) for r in rows],
            "end": [_iso(int(grid[r[4]])) for r in rows],
            "detail": [r[5] for r in rows],
        },
        schema={k: pl.String for k in ("node_id", "measurement", "kind", "start", "end", "detail")},
    )
    frame.write_csv(path)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _network_toml(nodes: list[_Node], scale: np.ndarray, districts: int, seed: int) -> str:
    """The topology file: districts, nodes and the per-node ranges validation should use.

    Ranges are wide enough to keep every simulated value, spikes and bursts included, so
    those reach the anomaly scoring instead of being quarantined as impossible. Each district
    gets mains length and service connections in proportion to its consumption (120
    connections per unit of consumer scale, 40 per km of main), chosen so that the simulated
    losses give an infrastructure leakage index of about 2, as in a well-run network.
    """
    dist_scale = np.zeros(districts)
    cons_scale = np.zeros(districts)
    for nd, sc in zip(nodes, scale, strict=True):
        dist_scale[nd.district] += sc
        if nd.role == "consumption":
            cons_scale[nd.district] += sc
    out = [
        f"# Synthetic network written by dataflows.simulate (seed {seed}).",
        "",
        "[defaults]",
        "pressure_band = [1.5, 7.0]",
        "",
        "[defaults.ranges]",
        "pressure = [0.0, 10.0]",
        f"level = [0.0, {_TANK_HEIGHT_M}]",
        "",
    ]
    for d in range(districts):
        name = _DISTRICTS[d][0] if d < len(_DISTRICTS) else f"District {d + 1}"
        connections = max(1, round(120 * cons_scale[d]))
        out += [
            f"[districts.d{d + 1}]",
            f"name = {_toml_str(name)}",
            f"mains_km = {round(connections / 40, 1)}",
            f"connections = {connections}",
            "",
        ]
    for i, nd in enumerate(nodes):
        out += [
            f"[nodes.{_toml_str(nd.node_id)}]",
            f"name = {_toml_str(nd.name)}",
            f'district = "d{nd.district + 1}"',
            f'role = "{nd.role}"',
            f"lat = {nd.lat}",
            f"lon = {nd.lon}",
        ]
        if nd.role == "consumption":
            out.append(f"ranges.flow_rate = [0.0, {math.ceil(15 * scale[i] + 10)}.0]")
        elif nd.role == "inflow":
            out.append(f"ranges.flow_rate = [0.0, {math.ceil(8 * dist_scale[nd.district] + 20)}.0]")
        elif nd.role == "quality":
            out.append("ranges.chlorine = [0.0, 5.0]")
            out.append("ranges.turbidity = [0.0, 50.0]")
        out.append("")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``waterflow simulate``; each help ends with its default."""
    p = argparse.ArgumentParser(
        prog="waterflow simulate",
        description="Write a synthetic water network: readings CSV, event labels, topology.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("simulated"), help="output folder")
    p.add_argument("--districts", type=int, default=2, help="districts (DMAs) in the network")
    p.add_argument("--nodes-per-district", type=int, default=5,
                   help="monitoring nodes per district (inflow meter included)")
    p.add_argument("--days", type=int, default=14, help="days of readings to write")
    p.add_argument("--step", type=int, default=300, help="seconds between readings")
    p.add_argument("--start", default="2024-11-04", help="first local day (or ISO datetime)")
    p.add_argument("--seed", type=int, default=42, help="random seed: same seed, same files")
    p.add_argument("--tz", default="Europe/Rome", help="local time zone of the network")
    p.add_argument("--no-events", action="store_true",
                   help="no injected incidents (leaks, bursts, stuck sensors...)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: ``waterflow simulate --out DIR [options]``."""
    p = build_parser()
    a = p.parse_args(argv)
    t = time.perf_counter()
    try:
        r = simulate(
            a.out,
            districts=a.districts,
            nodes_per_district=a.nodes_per_district,
            days=a.days,
            step_s=a.step,
            start=a.start,
            seed=a.seed,
            events=not a.no_events,
            tz=a.tz,
        )
    except ValueError as exc:
        print(f"waterflow simulate: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t
    print(f"{r.n_readings} readings of {r.n_nodes} nodes -> {r.readings_path} ({took:.1f} s)")
    print(f"event labels -> {r.labels_path}")
    print(f"network topology -> {r.network_path}")
    print(f"true daily volumes per district -> {r.truth_path}")
    return 0
