import datetime as dt
import math

from dataflows.balance import KEEP_DAYS, MAX_SPREAD_DAYS, DistrictBalance, NodeDayVolumes

DAY = dt.date(2024, 10, 27)  # 25 local hours in Europe/Rome; the day starts at 22:00Z


def _row(rows, i=0):
    return rows.frame.row(i, named=True)


def test_balance_losses_and_nrw_with_corrections():
    b = DistrictBalance("d1", "Europe/Rome")
    b.update(NodeDayVolumes("in", "inflow", [DAY], [100.0]))
    b.update(NodeDayVolumes("c1", "consumption", [DAY], [50.0]))
    row = _row(b.update(NodeDayVolumes("c2", "consumption", [DAY], [40.0])))
    assert row["period"] == "day"
    assert row["period_start"] == dt.datetime(2024, 10, 26, 22, tzinfo=dt.UTC)
    assert (row["inflow_m3"], row["consumption_m3"]) == (100.0, 90.0)
    assert math.isclose(row["loss_m3"], 10.0) and math.isclose(row["nrw"], 0.1)
    # a late reading corrects c2's day: the node's latest volume replaces the earlier one
    row = _row(b.update(NodeDayVolumes("c2", "consumption", [DAY], [45.0])))
    assert math.isclose(row["loss_m3"], 5.0) and math.isclose(row["nrw"], 0.05)


def test_unmetered_side_gives_unknown_not_zero():
    b = DistrictBalance("d1", "Europe/Rome")
    row = _row(b.update(NodeDayVolumes("c1", "consumption", [DAY], [50.0])))
    assert row["inflow_m3"] is None and row["loss_m3"] is None and row["nrw"] is None
    assert row["consumption_m3"] == 50.0


def test_old_days_are_dropped_and_ignored():
    b = DistrictBalance("d1", "UTC")
    days = [DAY + dt.timedelta(days=i) for i in range(KEEP_DAYS + 5)]
    b.update(NodeDayVolumes("in", "inflow", days, [1.0] * len(days)))
    assert min(b.volumes) == days[-1] - dt.timedelta(days=KEEP_DAYS)
    assert b.update(NodeDayVolumes("in", "inflow", [days[0]], [9.0])) is None


def _final(updates):
    """The last row written per day (the warm tier upserts by key)."""
    b, last = DistrictBalance("d1", "UTC", meters=frozenset({"in", "c1"})), {}
    for node in updates:
        rows = b.update(node)
        for row in rows.frame.iter_rows(named=True) if rows is not None else []:
            last[row["period_start"]] = (row["inflow_m3"], row["consumption_m3"])
    return last


def test_balance_does_not_depend_on_how_meters_interleave():
    # A replay hands over a meter's three weeks at once; a live flow interleaves the meters
    # day by day. The slowest meter holds the window open, so both give every day's balance.
    days = [DAY + dt.timedelta(days=i) for i in range(3 * KEEP_DAYS)]
    inflow = NodeDayVolumes("in", "inflow", days, [10.0 + i for i in range(len(days))])
    used = NodeDayVolumes("c1", "consumption", days, [8.0] * len(days))
    whole = _final([inflow, used])
    daily = _final(
        NodeDayVolumes(n.node_id, n.role, [d], [v])
        for d_i, d in enumerate(days)
        for n in (inflow, used)
        for v in [n.volumes[d_i]]
    )
    assert len(whole) == len(days)
    assert whole == daily
    assert all(c == 8.0 for _, c in whole.values())


def test_a_silent_meter_holds_the_days_back_only_so_far():
    b = DistrictBalance("d1", "UTC", meters=frozenset({"in", "c1"}))
    b.update(NodeDayVolumes("c1", "consumption", [DAY], [1.0]))  # then silent for good
    far = [DAY + dt.timedelta(days=i) for i in range(MAX_SPREAD_DAYS + 10)]
    b.update(NodeDayVolumes("in", "inflow", far, [1.0] * len(far)))
    assert min(b.volumes) == far[-1] - dt.timedelta(days=MAX_SPREAD_DAYS)
