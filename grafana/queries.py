"""The boards' queries as Grafana would send them, for checks and previews without Grafana.

``interpolate`` does what Grafana does to a PostgreSQL panel query before it reaches the
database: template variables first (multi-valued ones quoted and comma-joined, ``:sqlstring``
quoted and escaped, ``$__interval``), then the PostgreSQL datasource macros (``$__timeFilter``,
``$__timeFrom``, ``$__timeTo``, ``$__timeGroup``, ``$__timeGroupAlias``, ``$__time``). Used by
tests/integration/test_grafana_boards.py and grafana/render_previews.py.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).parent
REPO = HERE.parent
DASHBOARDS = HERE / "dashboards"
SAMPLES = REPO / "dataflows" / "samples"

#: The simulated week of dataflows/samples/ (its last reading is 2024-11-10 22:55Z): what an
#: operator looking at "Last 7 days" would have seen at the end of it.
SAMPLE_RANGE = (datetime.fromisoformat("2024-11-03T23:00:00+00:00"),
                datetime.fromisoformat("2024-11-10T23:00:00+00:00"))

_NICE = [1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600,
         86400, 7 * 86400]
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def load_boards() -> dict[str, dict[str, Any]]:
    """File stem -> dashboard JSON, for every committed board."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(DASHBOARDS.glob("*.json"))}


def parse_interval(text: str) -> float:
    """'15m' -> 900.0 seconds (Grafana's interval syntax)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(ms|s|m|h|d|w)\s*", text)
    if not m:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def format_interval(seconds: float) -> str:
    """900 -> '15m'."""
    for unit in ("w", "d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{int(seconds * 1000)}ms"


def panel_interval(panel: dict[str, Any], time_range: tuple[datetime, datetime],
                   max_points: int = 1000, datasource_min: str = "5m") -> str:
    """``$__interval`` of a panel, as Grafana computes it.

    The range divided by the data points, rounded up to a round step, at least the panel's (or
    the datasource's) minimum interval.
    """
    raw = (time_range[1] - time_range[0]).total_seconds() / max_points
    nice = next((n for n in _NICE if n >= raw), _NICE[-1])
    floor = parse_interval(panel.get("interval") or datasource_min)
    return format_interval(max(nice, floor))


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def interpolate_sql(query: str, variables: dict[str, list[str]], multi: set[str],
                    time_range: tuple[datetime, datetime], interval: str) -> str:
    """A PostgreSQL panel query with Grafana's variables and macros substituted."""
    start, end = time_range

    def var(m: re.Match[str]) -> str:
        name = m["name1"] or m["name2"]
        fmt = m["fmt"]
        if name == "__interval":
            return interval
        if name == "__interval_ms":
            return str(int(parse_interval(interval) * 1000))
        if name not in variables:
            return m[0]  # a macro such as $__timeFilter, handled below
        values = variables[name]
        if fmt == "sqlstring" or name in multi:
            return ",".join(_quote(v) for v in values)
        if fmt not in (None, "raw"):
            raise ValueError(f"variable format {fmt!r} of ${name} is not emulated")
        return values[0]

    query = re.sub(r"\$\{(?P<name1>\w+)(?::(?P<fmt>\w+))?\}|\$(?P<name2>\w+)", var, query)

    def group(col: str, step: str) -> str:
        secs = int(parse_interval(step.strip()))
        return f"floor(extract(epoch from {col})/{secs})*{secs}"

    def macro(m: re.Match[str]) -> str:
        name, args = m[1], [a.strip() for a in m[2].split(",")] if m[2].strip() else []
        if name == "timeFilter":
            return f"{args[0]} BETWEEN '{_ts(start)}' AND '{_ts(end)}'"
        if name == "timeFrom":
            return f"'{_ts(start)}'"
        if name == "timeTo":
            return f"'{_ts(end)}'"
        if name == "time":
            return f'{args[0]} AS "time"'
        if name == "timeGroup":
            return group(args[0], args[1])
        if name == "timeGroupAlias":
            return group(args[0], args[1]) + ' AS "time"'
        raise ValueError(f"macro $__{name} is not emulated")

    query = re.sub(r"\$__(\w+)\(([^()]*)\)", macro, query)
    if "$" in query.replace("$$", ""):
        raise ValueError(f"unsubstituted $ left in query: {query}")
    return query


def interpolate_promql(expr: str, variables: dict[str, list[str]]) -> str:
    """A PromQL panel expression as Grafana sends it (multi-valued variables as a regex)."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    expr = expr.replace("$__range", "1h")

    def var(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        values = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", v) for v in variables[name]]
        return values[0] if len(values) == 1 else "(" + "|".join(values) + ")"

    return re.sub(r"\$\{(\w+)\}|\$([a-z]\w*)", var, expr)


@dataclass
class Target:
    """One query of one panel."""

    board: str
    panel: dict[str, Any]
    target: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.board} / {self.panel['title']} / {self.target['refId']}"


def targets(boards: dict[str, dict[str, Any]]) -> Iterator[Target]:
    """Every query of every panel of the boards."""
    for name, board in boards.items():
        for panel in board.get("panels", []):
            for t in panel.get("targets", []):
                yield Target(name, panel, t)


def resolve_variables(conn: Any, board: dict[str, Any], time_range: tuple[datetime, datetime],
                      pick: dict[str, int] | None = None
                      ) -> tuple[dict[str, list[str]], set[str]]:
    """The values of a board's variables, by running their queries in order like Grafana does.

    Multi-valued variables take every option ("All"), or only option number ``pick[name]``;
    single ones their saved current value if it is an option, else the first option.
    """
    values: dict[str, list[str]] = {}
    multi: set[str] = set()
    for v in board.get("templating", {}).get("list", []):
        if v["type"] == "constant":
            values[v["name"]] = [v["query"]]
            continue
        if v["type"] != "query":
            raise ValueError(f"variable type {v['type']!r} of {v['name']} is not emulated")
        q = interpolate_sql(v["query"], values, multi, time_range, "5m")
        options = [str(r[0]) for r in conn.execute(q).fetchall()]
        if not options:
            raise AssertionError(f"variable ${v['name']} has no options: {q}")
        if v.get("multi") or v.get("includeAll"):
            chosen = (pick or {}).get(v["name"])
            values[v["name"]] = options if chosen is None else [options[chosen % len(options)]]
            multi.add(v["name"])
        else:
            current = (v.get("current") or {}).get("value")
            values[v["name"]] = [current if current in options else options[0]]
    return values, multi


def replay(url: str, redis_url: str, prefix: str, work: Path,
           paths: list[Path] | None = None) -> None:
    """``waterflow replay`` of dataflows/samples/ (or of ``paths``) into the warm tier ``url``."""
    from dataflows.cli import main

    code = main([
        "replay", *(str(p) for p in (paths or [SAMPLES])), "--quiet",
        "--network", str(SAMPLES / "network.toml"), "--now", "2026-01-01T00:00:00+00:00",
        "--warm", url, "--hot", redis_url, "--hot-prefix", prefix,
        "--cold", (work / "cold").as_uri(), "--out", str(work / "out"),
    ])
    if code != 0:
        raise RuntimeError(f"replay of {paths or SAMPLES} into {url} exited {code}")


@contextmanager
def replayed_database(admin_url: str, redis_url: str, work: Path) -> Iterator[str]:
    """A new PostgreSQL database filled by ``waterflow replay`` of dataflows/samples/.

    Yields its URL; the database (and the replay's Redis keys) are dropped afterwards.
    """
    import psycopg
    import redis
    from psycopg import sql

    name = f"waterflow_boards_{uuid.uuid4().hex[:10]}"
    prefix = f"water:boards-{uuid.uuid4().hex[:8]}:"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_with(admin_url, dbname=name)
    try:
        replay(url, redis_url, prefix, work)
        yield url
    finally:
        r = redis.from_url(redis_url)
        keys = list(r.scan_iter(match=prefix + "*"))
        if keys:
            r.delete(*keys)
        r.close()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))


def url_with(url: str, *, dbname: str) -> str:
    """A postgresql:// URL naming another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


def reader_role(conn: Any) -> str | None:
    """Switch the session to the read-only role water_reader if it exists; return its name."""
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'water_reader'").fetchone():
        conn.execute("SET ROLE water_reader")
        return "water_reader"
    return None


def run_target(conn: Any, t: Target, variables: dict[str, list[str]], multi: set[str],
               time_range: tuple[datetime, datetime]) -> tuple[str, list[str], list[tuple],
                                                              float]:
    """Run one SQL target; (the SQL sent, column names, rows, seconds it took)."""
    q = interpolate_sql(t.target["rawSql"], variables, multi, time_range,
                        panel_interval(t.panel, time_range))
    started = time.perf_counter()
    cur = conn.execute(q)
    rows = cur.fetchall()
    elapsed = time.perf_counter() - started
    cols = [d.name for d in cur.description or []]
    return q, cols, rows, elapsed
