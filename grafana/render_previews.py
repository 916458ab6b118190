# ruff: noqa: D103  (draw_<panel type> functions: one per Grafana panel type)
"""Renders grafana/previews/<board>.png: what each board's panels return, drawn with matplotlib.

No Grafana is needed: the script replays dataflows/samples/ into a new PostgreSQL database (like
the tests; dropped afterwards), runs every SQL panel query as Grafana would send it (variables
"All", the samples' simulated week as time range, as the read-only role water_reader) and draws
each panel's result in a grid titled like the panels.

For the Prometheus panels it starts a Prometheus of its own (the Debian package's binary, on a
free loopback port, data in a temporary folder, stopped by pid at the end) that scrapes this
process's metrics every second while it replays the samples a few more times, then asks it each
panel's PromQL over that window. Without a ``prometheus`` binary those panels show their PromQL.

    .venv/bin/python grafana/render_previews.py [--pg postgresql://...] [--redis redis://...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import psycopg  # noqa: E402

from grafana.queries import (  # noqa: E402
    SAMPLE_RANGE,
    SAMPLES,
    Target,
    interpolate_promql,
    load_boards,
    panel_interval,
    parse_interval,
    reader_role,
    replay,
    replayed_database,
    resolve_variables,
    run_target,
)

OUT = Path(__file__).parent / "previews"
COLS = 24  # Grafana's grid width
ROW_IN = 0.36  # inches per grid row


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _series(cols: list[str], rows: list[tuple]) -> dict[str, tuple[list, list]]:
    """A result in Grafana's time-series shapes (long with ``metric``, or wide) as series."""
    out: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    ti = cols.index("time")
    if "metric" in cols:
        mi, vi = cols.index("metric"), cols.index("value")
        for r in rows:
            xs, ys = out[str(r[mi])]
            xs.append(_time(r[ti]))
            ys.append(_num(r[vi]))
    else:
        for i, c in enumerate(cols):
            if i == ti:
                continue
            xs, ys = out[c]
            for r in rows:
                xs.append(_time(r[ti]))
                ys.append(_num(r[i]))
    return out


def _time(v: Any) -> datetime:
    if isinstance(v, int | float | Decimal):
        return datetime.fromtimestamp(float(v), tz=SAMPLE_RANGE[0].tzinfo)
    if isinstance(v, datetime):
        return v
    return datetime.combine(v, datetime.min.time(), tzinfo=SAMPLE_RANGE[0].tzinfo)


def _limits(panel: dict) -> list[float]:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    return [s["value"] for s in steps if s.get("value") is not None]


def _break_gaps(xs: list, ys: list) -> tuple[list, list]:
    """NaN where rows are missing (a gap over 3 steps), so lines do not bridge outages."""
    if len(xs) < 3:
        return xs, ys
    steps = sorted((b - a).total_seconds() for a, b in zip(xs, xs[1:], strict=False))
    step = steps[len(steps) // 2]
    out_x, out_y = [xs[0]], [ys[0]]
    for a, b, y in zip(xs, xs[1:], ys[1:], strict=False):
        if step > 0 and (b - a).total_seconds() > 3 * step:
            out_x.append(a + (b - a) / 2)
            out_y.append(float("nan"))
        out_x.append(b)
        out_y.append(y)
    return out_x, out_y


def _bar_width(panel: dict, sql: str, xs: list) -> float:
    """Bar width in days: the query's group interval, else the smallest step between rows."""
    if "$__timeGroup" in sql:
        return parse_interval(panel_interval(panel, SAMPLE_RANGE)) / 86400
    ordered = sorted(set(xs))
    steps = [(b - a).total_seconds() for a, b in zip(ordered, ordered[1:], strict=False)]
    return (min(steps) if steps else 3600) / 86400


def draw_timeseries(ax, panel, results) -> None:
    custom = panel["fieldConfig"]["defaults"].get("custom", {})
    bars = custom.get("drawStyle") == "bars"
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    points = custom.get("showPoints") == "always"
    drawn = 0
    for sql, cols, rows in results:
        series = _series(cols, rows)
        if {"min", "max", "avg"} <= set(series):
            xs, avg = _break_gaps(*series["avg"])
            _, lo = _break_gaps(*series["min"])
            _, hi = _break_gaps(*series["max"])
            nan = float("nan")
            ax.fill_between(xs, [nan if v is None else v for v in lo],
                            [nan if v is None else v for v in hi], alpha=0.35, label="min-max")
            ax.plot(xs, [nan if v is None else v for v in avg], lw=0.9, label="avg")
            drawn += 1
            continue
        bottom: dict[datetime, float] = defaultdict(float)
        items = sorted(series.items())[:12]
        for k, (name, (xs, ys)) in enumerate(items):
            ys_ = [v if v is not None else float("nan") for v in ys]
            if bars:
                width = _bar_width(panel, sql, xs)
                if stacked:
                    base = [bottom[x] for x in xs]
                    ax.bar(xs, ys_, width=width, bottom=base, label=name, align="edge")
                    for x, y in zip(xs, ys_, strict=True):
                        if y == y:
                            bottom[x] += y
                else:
                    w = width * 0.8 / len(items)
                    ax.bar([mdates.date2num(x) + k * w for x in xs], ys_, width=w, label=name,
                           align="edge")
            else:
                gx, gy = _break_gaps(xs, ys_)
                ax.plot(gx, gy, lw=0.9, label=name, marker="o" if points else None, ms=3)
            drawn += 1
    for lim in _limits(panel):
        ax.axhline(lim, color="red", lw=0.8, ls="--")
    if drawn:
        ax.legend(fontsize=6, loc="upper left", ncol=4, frameon=False)
        ax.set_xlim(SAMPLE_RANGE)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%a %d"))
    ax.tick_params(labelsize=7)
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    if unit == "percentunit":
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))


def _fmt(v: Any) -> str:
    if isinstance(v, Decimal):
        v = float(v)
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M")
    s = "" if v is None else str(v)
    return s if len(s) <= 22 else s[:21] + "…"


def draw_stat(ax, panel, results) -> None:
    _, cols, rows = results[0]
    ax.axis("off")
    if not rows:
        return
    cells = [(c, _fmt(v)) for c, v in zip(cols, rows[-1], strict=True)]
    for i, (c, v) in enumerate(cells):
        x = (i + 0.5) / len(cells)
        ax.text(x, 0.55, v, ha="center", va="center", fontsize=15, color="#1f60c4",
                weight="bold", transform=ax.transAxes)
        ax.text(x, 0.12, c, ha="center", va="center", fontsize=8, transform=ax.transAxes)


def draw_table(ax, panel, results) -> None:
    _, cols, rows = results[0]
    ax.axis("off")
    if not rows:
        return
    heat = panel["fieldConfig"]["defaults"]["custom"]["cellOptions"]["type"] == "color-background"
    if heat:
        values = [[_num(v) if _num(v) is not None else float("nan") for v in r[1:]] for r in rows]
        ax.axis("on")
        im = ax.imshow(values, aspect="auto", cmap="RdYlGn_r")
        ax.set_yticks(range(len(rows)), [str(r[0]) for r in rows], fontsize=7)
        ax.set_xticks(range(len(cols) - 1), cols[1:], fontsize=7)
        ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        return
    keep = [i for i, c in enumerate(cols) if c not in ("latitude", "longitude")][:9]
    shown = rows[:12]
    tbl = ax.table(cellText=[[_fmt(r[i]) for i in keep] for r in shown],
                   colLabels=[cols[i] for i in keep], loc="upper center", cellLoc="left")
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(6.5)
    tbl.scale(1, 1.15)
    if len(rows) > len(shown):
        ax.text(0.99, 0.0, f"{len(rows)} rows, first {len(shown)} shown", ha="right",
                fontsize=6, transform=ax.transAxes)


def draw_bars(ax, panel, results, horizontal: bool) -> None:
    _, cols, rows = results[0]
    if not rows:
        return
    labels = [str(r[0]) for r in rows]
    n = len(cols) - 1
    for j in range(1, len(cols)):
        vals = [_num(r[j]) or 0.0 for r in rows]
        pos = [i + (j - 1 - (n - 1) / 2) * 0.8 / n for i in range(len(rows))]
        if horizontal:
            ax.barh(pos, vals, height=0.8 / n, label=cols[j])
        else:
            ax.bar(pos, vals, width=0.8 / n, label=cols[j])
    if horizontal:
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
    else:
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
    if n > 1:
        ax.legend(fontsize=7, frameon=False)
    if panel["fieldConfig"]["defaults"].get("unit") == "percentunit":
        fmt = plt.FuncFormatter(lambda v, _: f"{v:.0%}")
        (ax.xaxis if horizontal else ax.yaxis).set_major_formatter(fmt)
    ax.tick_params(labelsize=7)


def draw_geomap(ax, panel, results) -> None:
    _, cols, rows = results[0]
    if not rows:
        return
    c = {name: i for i, name in enumerate(cols)}
    lon = [r[c["longitude"]] for r in rows]
    lat = [r[c["latitude"]] for r in rows]
    score = [_num(r[c["anomaly_score"]]) or 0.0 for r in rows]
    sc = ax.scatter(lon, lat, c=score, cmap="RdYlGn_r", vmin=0, vmax=1, s=60, edgecolor="k")
    for r in rows:
        silent = r[c["status"]] == "silent"
        ax.annotate(f"{r[c['node_id']]}{' (silent)' if silent else ''}",
                    (r[c["longitude"]], r[c["latitude"]]), fontsize=6.5,
                    xytext=(4, 4), textcoords="offset points")
    ax.figure.colorbar(sc, ax=ax, fraction=0.03, pad=0.01, label="latest anomaly score")
    ax.set_xlabel("longitude", fontsize=7)
    ax.set_ylabel("latitude", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_aspect("equal", adjustable="datalim")


def draw_promql(ax, panel) -> None:
    ax.axis("off")
    exprs = "\n".join(textwrap.fill(t["expr"], 70) for t in panel["targets"])
    ax.text(0.02, 0.85, "Prometheus (no server in this rendering):\n" + exprs,
            va="top", fontsize=7, family="monospace", transform=ax.transAxes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (loopback only)
        return json.loads(resp.read())


class PrometheusRun:
    """A private Prometheus scraping this process while the samples are replayed again."""

    def __init__(self, warm_url: str, redis_url: str, work: Path, rounds: int = 6) -> None:
        self.warm_url, self.redis_url, self.work, self.rounds = warm_url, redis_url, work, rounds
        self.window: tuple[float, float] = (0.0, 0.0)
        self.url = ""
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start Prometheus, replay the sample files one by one, note the time window."""
        import redis

        from connectors.metrics import serve

        metrics = serve(0)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = self.work / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n  - job_name: waterflow\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{metrics.port}']}}]\n")
        with (self.work / "prometheus.log").open("w") as log:
            self._proc = subprocess.Popen(
                [str(shutil.which("prometheus")), f"--config.file={config}",
                 f"--storage.tsdb.path={self.work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)
        prefix = f"water:previews-{uuid.uuid4().hex[:8]}:"
        try:
            deadline = time.time() + 30
            while True:
                try:
                    up = _get(f"{self.url}/api/v1/query?query=up")["data"]["result"]
                    if up and up[0]["value"][1] == "1":
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"Prometheus did not scrape the metrics: {config}")
                time.sleep(0.5)
            start = time.time()
            files = sorted(SAMPLES.glob("*.csv"))
            for i in range(self.rounds):
                time.sleep(3)
                replay(self.warm_url, self.redis_url, prefix, self.work / f"r{i}",
                       [files[i % len(files)]])
            time.sleep(4)
            self.window = (start, time.time())
        except BaseException:
            self.stop()
            raise
        finally:
            metrics.stop()
            r = redis.from_url(self.redis_url)
            keys = list(r.scan_iter(match=prefix + "*"))
            if keys:
                r.delete(*keys)
            r.close()

    def stop(self) -> None:
        """Stop the Prometheus this object started (by its pid)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._proc = None

    def query_range(self, expr: str, variables: dict[str, list[str]]) -> dict[str, tuple]:
        """Series name -> (times, values) of one expression over the collection window."""
        expr = interpolate_promql(expr.replace("$__rate_interval", "4s"), variables)
        q = urllib.parse.urlencode({"query": expr, "start": self.window[0],
                                    "end": self.window[1], "step": 1})
        out = {}
        for r in _get(f"{self.url}/api/v1/query_range?{q}")["data"]["result"]:
            name = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())) or expr[:30]
            xs = [datetime.fromtimestamp(t, tz=SAMPLE_RANGE[0].tzinfo) for t, _ in r["values"]]
            out[name] = (xs, [float(v) for _, v in r["values"]])
        return out


def draw_prometheus(ax, panel, prom: PrometheusRun, variables) -> None:
    drawn = 0
    for t in panel["targets"]:
        for name, (xs, ys) in sorted(prom.query_range(t["expr"], variables).items())[:10]:
            label = name
            legend = t.get("legendFormat", "")
            if legend:
                labels = dict(kv.split("=", 1) for kv in name.split(",") if "=" in kv)
                label = re.sub(r"\{\{(\w+)\}\}", lambda m, lb=labels: lb.get(m[1], ""), legend)
            ax.plot(xs, ys, lw=1, label=label)
            drawn += 1
    if drawn:
        ax.legend(fontsize=6, loc="upper left", ncol=3, frameon=False)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    else:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color="grey",
                transform=ax.transAxes)
    for lim in _limits(panel):
        ax.axhline(lim, color="red", lw=0.8, ls="--")
    ax.tick_params(labelsize=7)
    if panel["fieldConfig"]["defaults"].get("unit") == "percentunit":
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))


def render_board(conn, name: str, board: dict, out: Path,
                 prom: PrometheusRun | None = None) -> Path:
    variables, multi = resolve_variables(conn, board, SAMPLE_RANGE)
    panels = board["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, height * ROW_IN + 0.8))
    scope = ", ".join(f"{k} {v[0]}" for k, v in variables.items()
                      if k not in multi and k != "tz") or "all districts and nodes"
    if all("expr" in t for p in panels for t in p["targets"]):
        how = ("PromQL asked of a Prometheus that scraped this rendering's replays of"
               " dataflows/samples/ every second" if prom else
               "PromQL only: no Prometheus was available to this rendering")
        fig.suptitle(f"{board['title']}  ·  {how}", fontsize=11, x=0.01, ha="left")
    else:
        fig.suptitle(f"{board['title']}  ·  {SAMPLE_RANGE[0]:%Y-%m-%d %H:%M} to "
                     f"{SAMPLE_RANGE[1]:%Y-%m-%d %H:%M} UTC  ·  {scope}  ·  rendered from the"
                     " panels' SQL on a replay of dataflows/samples/", fontsize=11, x=0.01,
                     ha="left")
    grid = fig.add_gridspec(height, COLS, hspace=3.2, wspace=1.2, top=1 - 0.7 / (height * ROW_IN
                                                                              + 0.8),
                            bottom=0.03, left=0.04, right=0.99)
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=9, loc="left")
        if any("expr" in t for t in p["targets"]):
            if prom is None:
                draw_promql(ax, p)
            else:
                draw_prometheus(ax, p, prom, variables)
            continue
        results = []
        for t in p["targets"]:
            _, cols, rows, _ = run_target(conn, Target(name, p, t), variables, multi,
                                          SAMPLE_RANGE)
            results.append((t["rawSql"], cols, rows))
        if not any(rows for _, _, rows in results):
            ax.axis("off")
            ax.text(0.5, 0.5, "No data (nothing fills this table yet)", ha="center",
                    va="center", color="grey", fontsize=9, transform=ax.transAxes)
            continue
        kind = p["type"]
        if kind == "timeseries":
            draw_timeseries(ax, p, [r for r in results if r[2]])
        elif kind == "stat":
            draw_stat(ax, p, results)
        elif kind == "table":
            draw_table(ax, p, results)
        elif kind in ("bargauge", "barchart"):
            draw_bars(ax, p, results, horizontal=kind == "bargauge")
        elif kind == "geomap":
            draw_geomap(ax, p, results)
        else:
            raise ValueError(f"no preview for panel type {kind}")
    path = out / f"{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg", default=os.environ.get(
        "WATERFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of a PostgreSQL where a scratch database may be created")
    ap.add_argument("--redis", default=os.environ.get(
        "WATERFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"), help="Redis for the replay")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-prometheus", action="store_true",
                    help="show the Prometheus panels' PromQL instead of asking a Prometheus")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "waterflow"
    with tempfile.TemporaryDirectory() as work, \
            replayed_database(args.pg, args.redis, Path(work)) as url, \
            psycopg.connect(url, autocommit=True) as conn:
        prom = None
        if shutil.which("prometheus") and not args.no_prometheus:
            prom = PrometheusRun(url, args.redis, Path(work))
            prom.start()
        try:
            reader_role(conn)
            for name, board in load_boards().items():
                print(render_board(conn, name, board, args.out, prom))
        finally:
            if prom is not None:
                prom.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
