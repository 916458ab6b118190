import datetime as dt
import math

from dataflows.balance import KEEP_DAYS, DistrictBalance, NodeDayVolumes

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
