"""The network topology file: districts, nodes, and the per-node limits validation uses.

A TOML file (``WATERFLOW_NETWORK`` or ``--network``); every part is optional, so a replay of
files from an unknown network runs on the defaults below. Example::

    [defaults.ranges]            # plausible physical range, outside = quarantined
    pressure = [0.0, 12.0]

    [defaults]
    pressure_band = [2.0, 6.0]   # service band for the pressure-compliance KPI

    [defaults.limits]            # drinking-water limits for the water-quality compliance KPI
    chlorine = [0.2, 1.0]        # [low, high]; "nan" for a side with no limit:
    turbidity = [nan, 1.0]       # at most 1 NTU

    [districts.selargius]
    name = "Selargius"
    mains_km = 42.5              # optional: mains length, for the leakage index (ILI)
    connections = 3100           # optional: number of service connections
    private_pipe_km = 0.0        # optional: private pipe, property line to meter (default 0)
    pressure_m = 38.0            # optional: average zone pressure (default: its loggers)

    [nodes."selargius-nodo-via-sant-anna"]
    name = "Selargius (nodo Via Sant'Anna)"
    district = "selargius"
    role = "inflow"              # inflow | outflow | consumption | tank | pressure | quality
                                 # (outflow: a meter exporting water to another district)
    lat = 39.2539
    lon = 9.1622
    ranges.flow_rate = [0.0, 60.0]
    limits.chlorine = [0.1, 1.0] # a node's own limits win over the defaults
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataflows.model import MEASUREMENTS, NodeInfo

#: Physically plausible ranges in canonical units; a value outside is quarantined.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "flow_rate": (-50.0, 5000.0),
    "pressure": (-1.0, 25.0),
    "temperature": (-5.0, 50.0),
    "total_flow": (0.0, 1e10),
    "level": (-1.0, 100.0),
    "chlorine": (0.0, 10.0),
    "ph": (0.0, 14.0),
    "turbidity": (0.0, 1000.0),
    "conductivity": (0.0, 20000.0),
    "redox": (-1000.0, 1500.0),
}
#: Service pressure band (bar) for the pressure-compliance KPI.
DEFAULT_PRESSURE_BAND: tuple[float, float] = (1.5, 7.0)
_NONE = math.nan
#: Drinking-water limits (low, high; NaN: none) for the water-quality compliance KPI. pH,
#: conductivity (µS/cm at 20 °C) and turbidity (NTU: the Directive's indicator is "acceptable
#: and no abnormal change"; 1 NTU is its value for water leaving treatment) are from the EU
#: Drinking Water Directive 2020/2184, Annex I. It sets no chlorine limit: 0.2-1.0 mg/L is the
#: free residual Italian utilities keep at the tap (D.Lgs. 31/2001 recommends 0.2 mg/L).
#: Temperature and redox have no limit unless a network file gives one.
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {
    "ph": (6.5, 9.5),
    "conductivity": (_NONE, 2500.0),
    "turbidity": (_NONE, 1.0),
    "chlorine": (0.2, 1.0),
}
#: Measurements that limits may be set for: the water-quality ones.
QUALITY_MEASUREMENTS = ("chlorine", "ph", "turbidity", "conductivity", "temperature", "redox")
ROLES = ("inflow", "outflow", "consumption", "tank", "pressure", "quality")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What the topology says of one node (``None`` where it says nothing)."""

    node_id: str
    name: str | None = None
    district: str | None = None
    role: str | None = None
    lat: float | None = None
    lon: float | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    limits: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DistrictAssets:
    """A district's infrastructure, as the IWA unavoidable real losses (UARL) need it.

    ``pressure_m`` fixes the average zone pressure (m); None means: measured by the district's
    pressure loggers.
    """

    mains_km: float
    connections: int
    private_pipe_km: float = 0.0
    pressure_m: float | None = None


@dataclass(frozen=True, slots=True)
class Network:
    """Districts and nodes of a network, with the defaults for nodes it does not list."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RANGES))
    pressure_band: tuple[float, float] = DEFAULT_PRESSURE_BAND
    limits: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    districts: dict[str, str] = field(default_factory=dict)  # id -> display name
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    assets: dict[str, DistrictAssets] = field(default_factory=dict)  # districts that give them
    #: The node ids of each district, from ``nodes``: one lookup per district instead of a
    #: scan of every node (a network of 1 000 districts made that scan 10^7 steps).
    members: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members: dict[str, list[str]] = {}
        for node_id, spec in self.nodes.items():
            if spec.district is not None:
                members.setdefault(spec.district, []).append(node_id)
        object.__setattr__(self, "members", {d: tuple(ids) for d, ids in members.items()})

    def district_nodes(self, district: str) -> list[NodeSpec]:
        """The topology's nodes of ``district`` (none for a district it does not list)."""
        return [self.nodes[n] for n in self.members.get(district, ())]

    def range_arrays(self, node_id: str) -> tuple[Any, Any]:
        """Lower and upper limits for the node, one entry per measurement, in column order."""
        import numpy as np

        spec = self.nodes.get(node_id)
        own = spec.ranges if spec else {}
        lo = np.array([own.get(m, self.ranges[m])[0] for m in MEASUREMENTS], dtype=np.float64)
        hi = np.array([own.get(m, self.ranges[m])[1] for m in MEASUREMENTS], dtype=np.float64)
        return lo, hi

    def limit_arrays(self, node_id: str) -> tuple[Any, Any]:
        """Water-quality limits for the node per measurement, in column order (NaN: none)."""
        import numpy as np

        spec = self.nodes.get(node_id)
        limits = {**self.limits, **(spec.limits if spec else {})}
        none = (math.nan, math.nan)
        lo = np.array([limits.get(m, none)[0] for m in MEASUREMENTS], dtype=np.float64)
        hi = np.array([limits.get(m, none)[1] for m in MEASUREMENTS], dtype=np.float64)
        return lo, hi

    def node_info(self, seen: NodeInfo) -> NodeInfo:
        """A node as seen in a file, completed with what the topology knows of it."""
        spec = self.nodes.get(seen.node_id)
        if spec is None:
            return seen
        return NodeInfo(
            node_id=seen.node_id,
            name=spec.name or seen.name,
            source=seen.source,
            district=spec.district or seen.district,
            role=spec.role or seen.role,
            lat=spec.lat if spec.lat is not None else seen.lat,
            lon=spec.lon if spec.lon is not None else seen.lon,
        )


def _pair(value: Any, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
        or value[0] > value[1]
    ):
        raise ValueError(f"{where}: expected [low, high] with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _ranges(table: dict[str, Any], where: str) -> dict[str, tuple[float, float]]:
    unknown = set(table) - set(MEASUREMENTS)
    if unknown:
        raise ValueError(f"{where}: unknown measurement(s) {sorted(unknown)}")
    return {m: _pair(v, f"{where}.{m}") for m, v in table.items()}


def _limits(table: dict[str, Any], where: str) -> dict[str, tuple[float, float]]:
    """[low, high] per water-quality measurement; nan for a side without a limit."""
    unknown = set(table) - set(QUALITY_MEASUREMENTS)
    if unknown:
        raise ValueError(f"{where}: limits only for {QUALITY_MEASUREMENTS}, got {sorted(unknown)}")
    out = {}
    for m, value in table.items():
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not math.isinf(v) for v in value)
            or all(math.isnan(v) for v in value)
            or value[0] > value[1]
        ):
            raise ValueError(
                f"{where}.{m}: expected [low, high] (nan for no limit on a side), got {value!r}"
            )
        out[m] = (float(value[0]), float(value[1]))
    return out


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise ValueError(f"{where}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _assets(doc: dict[str, Any], where: str) -> DistrictAssets | None:
    """A district's infrastructure, or None when it gives neither mains nor connections."""
    if "mains_km" not in doc and "connections" not in doc:
        return None
    if "mains_km" not in doc or "connections" not in doc:
        raise ValueError(f"{where}: mains_km and connections go together (for the ILI)")
    pressure = doc.get("pressure_m")
    return DistrictAssets(
        mains_km=_number(doc["mains_km"], f"{where}.mains_km"),
        connections=int(_number(doc["connections"], f"{where}.connections")),
        private_pipe_km=_number(doc.get("private_pipe_km", 0.0), f"{where}.private_pipe_km"),
        pressure_m=None if pressure is None else _number(pressure, f"{where}.pressure_m"),
    )


def parse_network(doc: dict[str, Any], where: str = "network") -> Network:
    """Build a ``Network`` from a parsed TOML document, with errors that name the key."""
    defaults = doc.get("defaults", {})
    ranges = dict(DEFAULT_RANGES)
    ranges.update(_ranges(defaults.get("ranges", {}), f"{where}: defaults.ranges"))
    limits = dict(DEFAULT_LIMITS)
    limits.update(_limits(defaults.get("limits", {}), f"{where}: defaults.limits"))
    band = DEFAULT_PRESSURE_BAND
    if "pressure_band" in defaults:
        band = _pair(defaults["pressure_band"], f"{where}: defaults.pressure_band")
    districts = {k: str(v.get("name", k)) for k, v in doc.get("districts", {}).items()}
    assets = {
        k: a
        for k, v in doc.get("districts", {}).items()
        if (a := _assets(v, f"{where}: districts.{k}")) is not None
    }
    nodes = {}
    for node_id, spec in doc.get("nodes", {}).items():
        role = spec.get("role")
        if role is not None and role not in ROLES:
            raise ValueError(f"{where}: nodes.{node_id}.role must be one of {ROLES}, got {role!r}")
        nodes[node_id] = NodeSpec(
            node_id=node_id,
            name=spec.get("name"),
            district=spec.get("district"),
            role=role,
            lat=spec.get("lat"),
            lon=spec.get("lon"),
            ranges=_ranges(spec.get("ranges", {}), f"{where}: nodes.{node_id}.ranges"),
            limits=_limits(spec.get("limits", {}), f"{where}: nodes.{node_id}.limits"),
        )
    return Network(
        ranges=ranges, pressure_band=band, limits=limits, districts=districts, nodes=nodes,
        assets=assets,
    )


def load_network(path: str | Path | None) -> Network:
    """The network in a TOML file, or the defaults when no file is given."""
    if path is None:
        return Network()
    path = Path(path)
    with path.open("rb") as f:
        return parse_network(tomllib.load(f), where=str(path))
