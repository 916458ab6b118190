"""Snapshots written by an earlier release still load, and the run goes on as if never stopped.

A live deployment resumes from its recovery snapshots across an upgrade. The fixture
``tests/data/state_snapshots_801d7e6.pickle`` holds the four node objects of one meter (flow,
pressure, totalizer) pickled by commit 801d7e6 (before the state packing of the duplicate
memory, the forecast's hourly means, day facts and error rings, the scorer's slot tables and
the windows' extremes) after the first part of ``stream()``. Made with that release's code::

    git archive 801d7e6 dataflows | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/unit/test_state_snapshots.py \
        tests/data/state_snapshots_801d7e6.pickle
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dataflows.anomaly import NodeScorer
from dataflows.forecast import NodeForecaster
from dataflows.kpi import NodeWindows
from dataflows.model import COL, US_PER_HOUR, US_PER_MIN, ReadingBatch, empty_values
from dataflows.settings import Settings
from dataflows.topology import parse_network
from dataflows.validation import NodeValidator

FIXTURE = Path(__file__).parents[1] / "data" / "state_snapshots_801d7e6.pickle"
NODE = "m1"
DAYS = 10
#: The fixture's objects saw the hourly batches before this one.
CUT = 8 * 24 + 13
START_US = 1_717_200_000 * 1_000_000  # 2024-06-01 00:00 UTC


def settings() -> Settings:
    network = parse_network(
        {
            "districts": {"d1": {}},
            "nodes": {NODE: {"district": "d1", "role": "inflow"}},
        }
    )
    return Settings(network=network, now_us=START_US + 400 * 24 * US_PER_HOUR, tz="Europe/Rome")


def stream() -> list[ReadingBatch]:
    """Hourly batches of a meter at 5-minute steps, 3 decimals, with re-sends, a conflict,
    a late reading, a gap and a burst (so that every kind of state has something in it)."""
    rng = np.random.default_rng(11)
    n = DAYS * 24 * 12
    ts = START_US + np.arange(n, dtype=np.int64) * 5 * US_PER_MIN
    hour = (ts // US_PER_HOUR) % 24
    flow = 20 + 8 * np.sin((hour - 6) / 24 * 2 * np.pi) + rng.normal(0, 0.8, n)
    flow[n - 400 : n - 370] += 25  # a burst, after the cut
    flow[1500:1530] += 25  # and one before it
    flow = np.round(flow, 3)
    values = empty_values(n)
    values[:, COL["flow_rate"]] = flow
    values[:, COL["pressure"]] = np.round(4 - 0.02 * flow + rng.normal(0, 0.01, n), 3)
    values[:, COL["total_flow"]] = np.round(1000 + np.cumsum(flow) * 300 / 1000, 1)
    keep = np.ones(n, bool)
    keep[700:724] = False  # two hours missing
    batches = []
    line = 2
    for h in range(DAYS * 24):
        sel = np.flatnonzero(keep & (ts // US_PER_HOUR == ts[0] // US_PER_HOUR + h))
        resend = h % 7 == 3 and h > 30 and sel.size > 0
        if resend:  # a re-send of a reading 30 h old, and a conflicting one
            sel = np.r_[sel, sel[0] - 360, sel[0] - 361]
        b_ts, b_values = ts[sel], values[sel].copy()
        if resend:
            b_values[-1, COL["flow_rate"]] += 1.0
        batches.append(
            ReadingBatch(NODE, "fixture", b_ts, b_values, np.arange(line, line + len(sel)))
        )
        line += len(sel)
    return batches


def objects() -> dict[str, Any]:
    s = settings()
    return {
        "validation": NodeValidator(NODE, s),
        "anomaly": NodeScorer(NODE, s),
        "kpi": NodeWindows(NODE, s),
        "forecast": NodeForecaster(NODE, s.tz, s.holidays),
    }


def feed(objs: dict[str, Any], batches: list[ReadingBatch]) -> list[object]:
    """Run the batches through the objects as the flow chains them; what they emitted."""
    out: list[object] = []
    for batch in batches:
        v = objs["validation"].validate(batch)
        acc = v.accepted
        out += [
            acc.ts,
            acc.values,
            acc.flags,
            acc.quality,
            v.duplicates,
            [(q.reason, q.line) for q in v.quarantined],
        ]
        if len(acc):
            scores, events = objs["anomaly"].score(acc)
            scored = ReadingBatch(
                acc.node_id,
                acc.source,
                acc.ts,
                acc.values,
                acc.line,
                acc.quality,
                acc.flags,
                scores,
            )
            win = objs["kpi"].update(scored)
            fc = objs["forecast"].update(acc)
            out += [scores, events, win.late]
            out += [
                t.frame if t is not None else None
                for t in (win.kpi_15m, win.kpi_daily, fc.forecasts, fc.accuracy)
            ]
    out.append(objs["anomaly"].flush())
    fc = objs["forecast"].flush()
    out += [t.frame if t is not None else None for t in (fc.forecasts, fc.accuracy)]
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, pl.DataFrame):
        return isinstance(b, pl.DataFrame) and a.equals(b)
    return a == b


def test_snapshots_of_the_release_before_load_and_resume_as_a_run_never_stopped() -> None:
    batches = stream()
    plain = objects()
    feed(plain, batches[:CUT])
    straight = feed(plain, batches[CUT:])
    blobs = pickle.loads(FIXTURE.read_bytes())  # noqa: S301 - our own fixture
    old = {kind: pickle.loads(blob) for kind, blob in blobs.items()}  # noqa: S301
    resumed = feed(old, batches[CUT:])
    assert len(resumed) == len(straight)
    differ = [i for i, (a, b) in enumerate(zip(straight, resumed, strict=True)) if not _same(a, b)]
    assert not differ, f"outputs {differ[:5]} differ after resuming from the old snapshots"
    # the fixture exercised what it is meant to: events, forecasts, duplicates, conflicts
    assert any(isinstance(x, pl.DataFrame) and "yhat_lo" in x.columns for x in straight)
    assert any(isinstance(x, list) and x and hasattr(x[0], "anomaly_id") for x in straight)
    assert sum(x for x in straight if type(x) is int) > 0
    # and the old snapshots are larger than the new ones
    for kind, obj in plain.items():
        assert len(pickle.dumps(obj)) < len(blobs[kind]), kind


def test_the_state_of_a_meter_pickles_to_less_than_20_kb() -> None:
    objs = objects()
    feed(objs, stream())
    sizes = {
        kind: len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) for kind, obj in objs.items()
    }
    assert sum(sizes.values()) < 20_000, sizes


def _write_fixture(path: str) -> None:
    objs = objects()
    feed(objs, stream()[:CUT])
    blobs = {
        kind: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for kind, obj in objs.items()
    }
    Path(path).write_bytes(pickle.dumps(blobs, protocol=pickle.HIGHEST_PROTOCOL))
    print({kind: len(b) for kind, b in blobs.items()})


if __name__ == "__main__":
    _write_fixture(sys.argv[1])
