"""``waterflow forecast backtest`` on the BWDF excerpt shipped with the samples."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from dataflows.cli import main
from dataflows.cli_forecast import actual_hours, complete_weeks, replay, score_issues
from dataflows.settings import Settings

SAMPLES = Path(__file__).parents[2] / "dataflows" / "samples"
EXCERPT = SAMPLES / "bwdf_dma_inflows_excerpt_2021-10.csv"  # 2021-10-18 .. 11-07, 10 DMAs
TZ = "Europe/Rome"


def test_backtest_prints_the_three_metrics_per_model_and_dma(capsys):
    assert main(["forecast", "backtest", str(EXCERPT), "--weeks", "2021-11-01",
                 "--detail", "--every-day"]) == 0
    out = capsys.readouterr().out
    assert "weeks scored: 2021-11-01" in out
    for name in ("PI1_seasonal", "PI2_ridge", "PI3_seasonal", "dma-10", "every daily issue"):
        assert name in out


def test_backtest_without_weeks_says_what_to_give(capsys):
    assert main(["forecast", "backtest", str(EXCERPT)]) == 2
    assert "--weeks" in capsys.readouterr().out


def test_scores_of_the_excerpt_week_match_the_actuals():
    run = replay(EXCERPT, Settings(now_us=2**62))
    monday = date(2021, 11, 1).toordinal()
    # the Monday weeks of the excerpt whose actuals are 95 % known for every DMA (the first
    # week lacks data of some)
    assert complete_weeks(run, TZ, 4) == [date(2021, 10, 25).toordinal(), monday]
    scores = score_issues(run, [monday], TZ)
    assert scores.height == 20  # 10 DMAs x 2 models
    assert set(scores["model"]) == {"seasonal", "ridge"}
    # all errors are finite and the max over a day is at least its mean
    assert (scores["PI2"] >= scores["PI1"]).all()
    # a DMA's actuals over the week: the hours of the file, in L/s
    week = actual_hours(run.actuals["dma-3"], monday, TZ)
    assert week.shape == (168,) and 1.0 < float(week[:24].mean()) < 10.0
