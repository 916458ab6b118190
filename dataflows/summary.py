"""The readable summary printed at the end of a replay."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from connectors.embedded import PG_DIR, REDIS_FILE
from connectors.run_report import RunReport
from dataflows.settings import redact_url

if TYPE_CHECKING:
    from connectors.tiers import TierConfig


def tier_lines(config: TierConfig, wanted: TierConfig, out: Path, keep_serving: bool) -> list[str]:
    """Where the results are, as a person can use it after the replay.

    ``config`` holds the URLs the run used, ``wanted`` the ones given (None: embedded). An
    embedded server's URL is a socket that is gone once it stops, so it is described by where
    its data stays instead; passwords are never shown.
    """
    if wanted.warm_url is not None:
        warm = f"{redact_url(config.warm_url or '')} (schema water)"
    elif keep_serving:
        warm = (f"{redact_url(config.warm_url or '')} (schema water; embedded PostgreSQL left "
                f"running, data in {out / PG_DIR})")
    else:
        warm = (f"embedded PostgreSQL, stopped; data in {out / PG_DIR} (schema water): "
                "replay with --keep-serving to query it")
    if wanted.hot_url is not None:
        hot = redact_url(config.hot_url or "")
    else:
        hot = f"embedded Redis, stopped at the end of the replay; data saved in {out / REDIS_FILE}"
    cold = redact_url(config.cold_url or "")
    if cold.startswith("file://"):
        cold += " (Parquet archive)"
    return [f"warm: {warm}", f"hot:  {hot}", f"cold: {cold}"]


def format_summary(report: RunReport, elapsed_s: float, where: list[str]) -> str:
    """The end-of-run summary: the ledger, why readings were quarantined, what was produced."""
    rate = report.rows_in / elapsed_s if elapsed_s > 0 else 0.0
    balanced = report.rows_in == report.accepted + report.quarantined + report.duplicates
    lines = [
        f"run {report.run_id} ({report.state}): {report.rows_in:,} readings in "
        f"{elapsed_s:.1f} s ({rate:,.0f} readings/s)",
        f"  accepted      {report.accepted:>12,}  (late for their KPI window: {report.late:,})",
        f"  quarantined   {report.quarantined:>12,}",
        f"  duplicates    {report.duplicates:>12,}  (exact duplicates, dropped)",
        "  ledger        "
        + ("reconciled: in = accepted + quarantined + duplicates" if balanced else
           f"DOES NOT RECONCILE: {report.rows_in:,} in vs "
           f"{report.accepted + report.quarantined + report.duplicates:,} out"),
    ]
    if report.values_quarantined:
        lines.append(
            f"  single values quarantined from accepted readings: {report.values_quarantined:,}"
        )
    if report.reasons:
        lines.append("  quarantine by reason:")
        lines += [f"    {reason:<28} {n:>10,}" for reason, n in report.reasons.items()]
    span = f"{report.first_ts} .. {report.last_ts}" if report.first_ts else "no readings"
    lines.append(f"  nodes {report.nodes:,}, readings {span}")
    lines.append(f"  KPI rows: {report.kpi_15m:,} of 15 min, {report.kpi_daily:,} daily")
    if report.anomalies:
        kinds = ", ".join(f"{k} {n}" for k, n in report.anomalies.items())
        lines.append(f"  anomaly events: {sum(report.anomalies.values())} ({kinds})")
    else:
        lines.append("  anomaly events: none")
    lines.append("  results:")
    lines += [f"    {w}" for w in where]
    return "\n".join(lines)
