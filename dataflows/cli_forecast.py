"""``waterflow forecast backtest``: replay a file through the forecast models and score them.

The readings go through the pipeline's own validation and forecast objects
(``NodeValidator``, ``NodeForecaster``, ``DistrictForecaster``), in file order, so the
forecasts are those a replay writes to ``water.forecasts``. The chosen weeks are scored with
the three metrics of the Battle of Water Demand Forecasting (WDSA/CCWI 2024), in L/s, on the
forecast issued at the week's first local midnight: PI1, the mean absolute error over the
first 24 hours; PI2, the maximum absolute error over the first 24 hours; PI3, the mean
absolute error over hours 25-168. Hours without an actual value are left out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

from dataflows.config_check import add_holiday_option, holidays_given
from dataflows.forecast import (
    HORIZON_H,
    DistrictForecaster,
    ForecastOut,
    NodeForecaster,
    closed_days_by_district,
    district_meters,
)
from dataflows.forecast_calendar import local_midnight_us, target_slots
from dataflows.settings import Settings, tz_from_env
from dataflows.topology import load_network
from dataflows.validation import NodeValidator

#: A week is "complete" for ``--last`` when this share of its series' hours is known.
COMPLETE_SHARE = 0.95


@dataclass(slots=True)
class Replayed:
    """What the replay produced: forecast frames and each series' closed days."""

    forecasts: list[pl.DataFrame] = field(default_factory=list)
    actuals: dict[str, dict[int, np.ndarray]] = field(default_factory=lambda: defaultdict(dict))


def replay(path: Path, settings: Settings, fmt: str = "auto") -> Replayed:
    """Every forecast of the file's replay, and the hourly actuals of every series."""
    from connectors.formats import read_path

    network = settings.network
    out = Replayed()
    validators: dict[str, NodeValidator] = {}
    nodes: dict[str, NodeForecaster] = {}
    districts: dict[str, DistrictForecaster] = {}

    def take(result: ForecastOut) -> None:
        if result.forecasts is not None:
            out.forecasts.append(result.forecasts.frame)
        for closed in result.closed:
            out.actuals[closed.series_id][closed.day] = closed.values
        for district, closed in closed_days_by_district(network, result):
            if district not in districts:
                districts[district] = DistrictForecaster(
                    district, settings.tz, district_meters(network, district), settings.holidays
                )
            take(districts[district].update(closed))

    for chunk in read_path(path, settings, fmt):
        for batch in chunk.batches:
            validator = validators.setdefault(
                batch.node_id, NodeValidator(batch.node_id, settings)
            )
            accepted = validator.validate(batch).accepted
            if len(accepted):
                node = nodes.setdefault(
                    batch.node_id, NodeForecaster(batch.node_id, settings.tz, settings.holidays)
                )
                take(node.update(accepted))
    for node in nodes.values():
        take(node.flush())
    for district in districts.values():  # a district's actuals: its meters' sum
        for day in {d for m in district.meters for d in out.actuals.get(m, {})}:
            total = np.zeros(24)
            for meter, sign in district.meters.items():
                total += sign * out.actuals.get(meter, {}).get(day, np.full(24, np.nan))
            out.actuals[district.series.series_id][day] = total
    return out


def actual_hours(days: dict[int, np.ndarray], issue_day: int, tz: str) -> np.ndarray:
    """The ``HORIZON_H`` actual hourly values after the local midnight of ``issue_day``."""
    _, slots = target_slots(issue_day, HORIZON_H, tz)
    out = np.full(HORIZON_H, np.nan)
    for i, slot in enumerate(slots):
        values = days.get(issue_day + int(slot) // 24)
        if values is not None:
            out[i] = values[int(slot) % 24]
    return out


def bwdf_metrics(yhat: np.ndarray, actual: np.ndarray) -> tuple[float, float, float]:
    """(PI1, PI2, PI3) of a 168-hour forecast; NaN where no actual is known.

    >>> a = np.arange(168.0)
    >>> bwdf_metrics(a + np.r_[np.full(24, 2.0), np.full(144, -1.0)], a)
    (2.0, 2.0, 1.0)
    """
    err = np.abs(yhat - actual)
    first, rest = err[:24][~np.isnan(err[:24])], err[24:][~np.isnan(err[24:])]
    pi1 = float(first.mean()) if first.size else float("nan")
    pi2 = float(first.max()) if first.size else float("nan")
    pi3 = float(rest.mean()) if rest.size else float("nan")
    return pi1, pi2, pi3


def score_issues(
    run: Replayed, issue_days: list[int], tz: str
) -> pl.DataFrame:
    """One row per (issue, series, model) with the three metrics."""
    forecasts = pl.concat(run.forecasts) if run.forecasts else None
    rows = []
    for day in issue_days:
        issued = local_midnight_us(day, tz)
        if forecasts is None:
            break
        issue = forecasts.filter(pl.col("issued_at").dt.epoch("us") == issued)
        for (series, model), part in issue.group_by(["node_id", "model"], maintain_order=True):
            actual = actual_hours(run.actuals.get(str(series), {}), day, tz)
            if np.isnan(actual).all():
                continue
            yhat = part.sort("target_ts")["yhat"].to_numpy()
            pi1, pi2, pi3 = bwdf_metrics(yhat, actual)
            rows.append((date.fromordinal(day).isoformat(), series, model, pi1, pi2, pi3))
    schema = ["week", "series", "model", "PI1", "PI2", "PI3"]
    scores = pl.DataFrame(rows, schema=schema, orient="row")
    return scores.with_columns(pl.col("PI1", "PI2", "PI3").fill_nan(None))


def complete_weeks(run: Replayed, tz: str, last: int) -> list[int]:
    """The last ``last`` Monday weeks with ``COMPLETE_SHARE`` of every series' hours known."""
    days = sorted({d for series in run.actuals.values() for d in series})
    if not days:
        return []
    monday = days[-1] - date.fromordinal(days[-1]).weekday()
    found: list[int] = []
    while monday >= days[0] and len(found) < last:
        known = [
            np.mean(~np.isnan(actual_hours(series, monday, tz)))
            for series in run.actuals.values()
        ]
        if known and min(known) >= COMPLETE_SHARE:
            found.append(monday)
        monday -= 7
    return sorted(found)


def _weeks(texts: list[str]) -> list[int]:
    out = []
    for text in texts:
        for part in text.split(","):
            if part.strip():
                out.append(date.fromisoformat(part.strip()).toordinal())
    return out


def add_forecast_parser(sub: argparse._SubParsersAction) -> None:
    """``waterflow forecast backtest``."""
    fc = sub.add_parser("forecast", help="demand forecasts: backtest the models on a file")
    fc_sub = fc.add_subparsers(dest="forecast_command", required=True)
    p = fc_sub.add_parser(
        "backtest",
        help="replay a file through the forecast models and print the BWDF metrics",
        description="Replay a file through validation and the forecast models, then print per "
        "model and series (node or district) the Battle of Water Demand Forecasting metrics of "
        "the forecast issued at 00:00 local time of each chosen day: PI1 = MAE over hours "
        "1-24, PI2 = max absolute error over hours 1-24, PI3 = MAE over hours 25-168 (L/s).",
    )
    p.add_argument("file", type=Path, help="a file in any supported format")
    p.add_argument("--weeks", nargs="*", default=[], metavar="YYYY-MM-DD",
                   help="first days of the weeks to score (local dates; the forecast issued "
                   "at their 00:00 is scored over 168 h); comma- or space-separated "
                   "(default: none)")
    p.add_argument("--last", type=int, default=0, metavar="N",
                   help="also score the last N Monday weeks whose actuals are at least "
                   f"{COMPLETE_SHARE:.0%}% known for every series (default 0)")
    p.add_argument("--every-day", action="store_true",
                   help="also print the mean over every daily issue of the replay")
    p.add_argument("--network", type=Path, help="topology TOML: districts are scored too "
                   "(default: none, nodes only)")
    p.add_argument("--tz", default=tz_from_env(), help="network's zone (default Europe/Rome)")
    add_holiday_option(p)
    p.add_argument("--format", default="auto", help="input format (default auto)")
    p.add_argument("--detail", action="store_true", help="print every week, series and model")
    p.set_defaults(func=backtest)


def backtest(args: argparse.Namespace) -> int:
    """Run ``waterflow forecast backtest``; 0 on success, 2 when there is nothing to score."""
    settings = Settings(
        run_id="backtest",
        tz=args.tz,
        network=load_network(args.network),
        holidays=holidays_given(args.holiday),  # checked before the file is read
        now_us=2**62,  # an old file is not "in the future"
    )
    run = replay(args.file, settings, args.format)
    weeks = sorted(set(_weeks(args.weeks)) | set(complete_weeks(run, args.tz, args.last)))
    if not weeks and not args.every_day:
        print("error: no week to score: give --weeks, --last or --every-day")
        return 2
    if weeks:
        scores = score_issues(run, weeks, args.tz)
        print("weeks scored:", ", ".join(date.fromordinal(w).isoformat() for w in weeks))
        _print_scores(scores, args.detail)
    if args.every_day:
        days = sorted({d + 1 for series in run.actuals.values() for d in series})
        scores = score_issues(run, days, args.tz)
        print(f"\nevery daily issue ({scores['week'].n_unique()} issue days):")
        _print_scores(scores, detail=False)
    return 0


def _print_scores(scores: pl.DataFrame, detail: bool) -> None:
    if scores.is_empty():
        print("no forecast was issued for these days (too little history before them?)")
        return
    with pl.Config(tbl_rows=1000, tbl_hide_dataframe_shape=True, float_precision=3,
                   tbl_hide_column_data_types=True):
        if detail:
            print(scores.sort("week", "series", "model"))
        # Sorted: group_by's order is not stable, and the pivot's columns follow the rows.
        per_series = scores.group_by("series", "model").agg(
            pl.len().alias("weeks"), pl.col("PI1", "PI2", "PI3").mean()
        ).sort("series", "model")
        print("mean per series (L/s):")
        print(per_series.pivot("model", index="series", values=["PI1", "PI2", "PI3"])
              .sort("series"))
        overall = per_series.group_by("model").agg(pl.col("PI1", "PI2", "PI3").mean())
        print("mean over series (L/s):")
        print(overall.sort("model"))
