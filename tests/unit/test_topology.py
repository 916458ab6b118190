import numpy as np
import pytest

from dataflows.model import COL
from dataflows.topology import DEFAULT_RANGES, load_network, parse_network


def test_defaults_when_no_file():
    net = load_network(None)
    lo, hi = net.range_arrays("any-node")
    assert lo[COL["pressure"]] == DEFAULT_RANGES["pressure"][0]
    assert hi[COL["flow_rate"]] == DEFAULT_RANGES["flow_rate"][1]


def test_node_ranges_override_defaults(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(
        """
[defaults.ranges]
pressure = [0.5, 10.0]
[defaults]
pressure_band = [2.0, 6.0]
[districts.sel]
name = "Selargius"
[nodes.n1]
name = "Node one"
district = "sel"
role = "inflow"
lat = 39.25
lon = 9.16
ranges.flow_rate = [0.0, 60.0]
"""
    )
    net = load_network(path)
    lo, hi = net.range_arrays("n1")
    assert (lo[COL["flow_rate"]], hi[COL["flow_rate"]]) == (0.0, 60.0)
    assert (lo[COL["pressure"]], hi[COL["pressure"]]) == (0.5, 10.0)
    other_lo, _ = net.range_arrays("n2")
    assert np.isclose(other_lo[COL["flow_rate"]], DEFAULT_RANGES["flow_rate"][0])
    assert net.pressure_band == (2.0, 6.0)
    assert net.districts == {"sel": "Selargius"}


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"defaults": {"ranges": {"pressur": [0, 1]}}}, "unknown measurement"),
        ({"defaults": {"ranges": {"pressure": [3, 1]}}}, "low <= high"),
        ({"nodes": {"x": {"role": "pump"}}}, "role must be one of"),
        ({"defaults": {"pressure_band": [1, float("nan")]}}, "expected [low, high]"),
    ],
)
def test_bad_topology_names_the_key(doc, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_network(doc)
