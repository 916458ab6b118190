from pathlib import Path

import pytest

from connectors.run_report import RunReport
from dataflows.cli import _check_formats, build_parser, main
from dataflows.summary import format_summary

DATA = Path(__file__).parents[1] / "data"


def test_formats_are_checked_before_anything_runs(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b"\x00\x01\x02 not a table")
    good = DATA / "canonical_example.csv"
    readable, bad = _check_formats([empty, binary, good], "auto")
    assert readable == [binary, good]
    assert len(bad) == 1 and "blob.csv" in bad[0]
    assert "empty.csv is empty, skipped" in capsys.readouterr().err
    assert main(["replay", str(binary), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # refused before any tier was started


def test_replay_options_parse():
    args = build_parser().parse_args(
        ["replay", "a.csv", "--now", "2026-01-01T00:00:00+00:00", "--workers", "2"]
    )
    assert args.now == 1_767_225_600_000_000
    assert args.workers == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["replay", "a.csv", "--now", "2026-01-01T00:00:00"])


def test_summary_shows_the_ledger_and_reasons():
    report = RunReport(
        run_id="r1", rows_in=10, accepted=7, quarantined=2, duplicates=1,
        values_quarantined=1, late=1, state="finished", nodes=2, first_ts="2024-01-01 00:00:00+00",
        last_ts="2024-01-02 00:00:00+00", reasons={"parse_error": 2, "non_finite": 1},
        anomalies={"leak": 1}, kpi_15m=96, kpi_daily=2,
    )
    text = format_summary(report, 2.0, ["warm: x"])
    assert "run r1 (finished): 10 readings in 2.0 s (5 readings/s)" in text
    assert "reconciled" in text
    assert "parse_error" in text and "anomaly events: 1 (leak 1)" in text
    report.accepted = 6
    assert "DOES NOT RECONCILE: 10 in vs 9 out" in format_summary(report, 2.0, [])
