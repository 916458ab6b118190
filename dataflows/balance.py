"""Daily water balance per district: inflow vs metered consumption, losses, non-revenue water.

The balance is built from the nodes' daily volumes (``kpi_daily.volume_m3``), using the roles
of the network topology: ``inflow`` meters feed the district, ``consumption`` meters are what
it delivers. Losses = inflow - consumption; NRW = losses / inflow. A node's daily row is
re-emitted as late readings correct it, so the balance keeps the latest volume per node and
day and recomputes the touched days (downstream upserts by key).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import numpy as np

from dataflows.tables import TableRows, frame

#: Days kept behind the district's watermark (the oldest of its meters' newest days, every
#: inflow and consumption meter of the topology counted, reported yet or not): late
#: daily rows older than this no longer move the balance (the KPI windows themselves close
#: after hours, so this is generous). Measured from the slowest meter, not the fastest, so the
#: result does not depend on how the meters' readings interleave (a replay cuts a file into
#: large chunks, a live flow into small ones).
KEEP_DAYS = 7
#: ...but a meter that went silent holds back no more than this many days behind the newest
#: day: the state per district stays bounded.
MAX_SPREAD_DAYS = 62
BALANCE_ROLES = ("inflow", "consumption")


@dataclass(slots=True)
class NodeDayVolumes:
    """The daily volumes one node's KPI rows carried, with the node's role."""

    node_id: str
    role: str
    days: list[dt.date]
    volumes: list[float | None]


@dataclass(slots=True)
class DistrictBalance:
    """The open days of one district: the latest daily volume of each of its metered nodes."""

    district: str
    tz: str
    volumes: dict[dt.date, dict[tuple[str, str], float]] = field(default_factory=dict)
    meters: frozenset[str] = frozenset()  # the district's metered nodes, from the topology
    newest: dict[str, dt.date] = field(default_factory=dict)  # each meter's newest day

    def update(self, node: NodeDayVolumes) -> TableRows | None:
        """Take a node's daily volumes; rows of the days whose balance they changed."""
        touched = []
        oldest = self._oldest_open()
        for day, volume in zip(node.days, node.volumes, strict=True):
            if volume is None or np.isnan(volume):
                continue
            if oldest is not None and day < oldest:
                continue  # long closed: its balance stands as last written
            self.volumes.setdefault(day, {})[(node.role, node.node_id)] = float(volume)
            touched.append(day)
            if day > self.newest.get(node.node_id, day - dt.timedelta(days=1)):
                self.newest[node.node_id] = day
        rows = self._rows(sorted(set(touched))) if touched else None
        oldest = self._oldest_open()
        if oldest is not None:
            for day in [d for d in self.volumes if d < oldest]:
                del self.volumes[day]
        return rows

    def _oldest_open(self) -> dt.date | None:
        """The oldest day whose balance can still change, None before any volume."""
        if not self.newest:
            return None
        fastest = max(self.newest.values())
        cap = fastest - dt.timedelta(days=MAX_SPREAD_DAYS)
        if not self.meters <= self.newest.keys():
            return cap  # a meter has not reported yet: it may still bring any recent day
        slowest = min(self.newest.values())
        return max(slowest - dt.timedelta(days=KEEP_DAYS), cap)

    def _rows(self, days: list[dt.date]) -> TableRows:
        zone = ZoneInfo(self.tz)
        starts = [
            dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC) for day in days
        ]
        inflow = np.array([self._total(day, "inflow") for day in days])
        consumption = np.array([self._total(day, "consumption") for day in days])
        loss = inflow - consumption  # NaN unless both sides were metered that day
        with np.errstate(divide="ignore", invalid="ignore"):
            nrw = np.where(inflow > 0, loss / inflow, np.nan)
        return frame(
            "district_balance",
            {
                "district": [self.district] * len(days),
                "period": ["day"] * len(days),
                "period_start": starts,
                "inflow_m3": inflow,
                "consumption_m3": consumption,
                "loss_m3": loss,
                "nrw": nrw,
            },
        )

    def _total(self, day: dt.date, role: str) -> float:
        """The day's volume over the nodes of a role; NaN when none of them reported."""
        values = [v for (r, _), v in self.volumes[day].items() if r == role]
        return float(sum(values)) if values else float("nan")
