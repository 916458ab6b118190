"""The readable summary printed at the end of a replay."""

from __future__ import annotations

from connectors.run_report import RunReport


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
