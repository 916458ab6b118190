# ruff: noqa: D103  (panel and board builders: their names say what they build)
"""Writes grafana/dashboards/*.json, the operators' boards, from the definitions below.

Run ``.venv/bin/python grafana/build_dashboards.py`` after editing and commit the JSON; the
output is deterministic (stable uids and panel ids, sorted keys), so a regeneration without
changes leaves ``git diff`` clean, and tests/integration/test_grafana_boards.py checks that the
committed files are what this script writes.

Every SQL query reads the warm tier (schema ``water``, DESIGN.md "The contract, in detail")
through the provisioned datasource ``waterflow-pg`` and uses Grafana's macros
(``$__timeFilter``, ``$__timeGroupAlias``, ``$__timeFrom``, ``$__timeTo``) so it only reads the
dashboard's time range. Macro arguments are plain columns (no nested parentheses). Variables:
``district`` and ``node`` from ``water.nodes`` (``node`` follows ``district``); multi-valued
variables are quoted by Grafana, the single ``node`` of the node-detail board is written
``${node:sqlstring}`` (quoted and escaped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from textwrap import dedent
from typing import Any

OUT = Path(__file__).parent / "dashboards"
PG = {"type": "grafana-postgresql-datasource", "uid": "waterflow-pg"}
PROM = {"type": "prometheus", "uid": "waterflow-prom"}
SCHEMA_VERSION = 41  # Grafana 11.6
TAG = "waterflow"

#: Limits drawn on the water-quality board (EU Directive 2020/2184 parameters and indicator
#: values; chlorine: the residual Italian utilities keep at the tap). (unit, low, high)
QUALITY_LIMITS: dict[str, tuple[str, str, float | None, float | None]] = {
    "chlorine": ("Free chlorine", "mg/L", 0.2, 1.0),
    "ph": ("pH", "none", 6.5, 9.5),
    "turbidity": ("Turbidity", "NTU", None, 1.0),
    "conductivity": ("Conductivity", "µS/cm", None, 2500.0),
    "temperature": ("Temperature", "celsius", None, 25.0),
}

Json = dict[str, Any]


def sql(ref: str, query: str, fmt: str = "time_series") -> Json:
    """A PostgreSQL target in code mode."""
    return {
        "datasource": PG,
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": dedent(query).strip(),
        "refId": ref,
    }


def prom(ref: str, expr: str, legend: str) -> Json:
    """A Prometheus range-query target."""
    return {
        "datasource": PROM,
        "editorMode": "code",
        "expr": " ".join(dedent(expr).split()),
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def _panel(kind: str, title: str, description: str, targets: list[Json], size: tuple[int, int],
           rest: Json) -> Json:
    """A panel of ``kind``: the fields every panel has, then its own (``_size`` for the layout)."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": targets[0]["datasource"],
        "targets": targets,
        **rest,
        "_size": size,
    }


LEGEND = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True}
TOOLTIP = {"mode": "multi", "sort": "desc"}


def timeseries(title: str, targets: list[Json], unit: str = "short", *, w: int = 12, h: int = 8,
               bars: bool = False, stack: bool = False, description: str = "",
               limits: Json | None = None, interval: str | None = None,
               overrides: list[Json] | None = None, min_: float | None = None,
               points: bool = False) -> Json:
    custom: Json = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "lineWidth": 1,
        "showPoints": "always" if points else "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    defaults: Json = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if limits is not None:
        defaults["thresholds"] = limits
        custom["thresholdsStyle"] = {"mode": "line+area"}
    if min_ is not None:
        defaults["min"] = min_
    panel: Json = _panel(
        "timeseries", title, description, targets, (w, h),
        {
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": LEGEND, "tooltip": TOOLTIP},
        },
    )
    if interval:
        panel["interval"] = interval
    return panel


def stat(title: str, targets: list[Json], unit: str = "short", *, w: int = 12, h: int = 4,
         description: str = "", steps: Json | None = None, fields: str = "",
         overrides: list[Json] | None = None) -> Json:
    return _panel(
        "stat", title, description, targets, (w, h),
        {
            "fieldConfig": {
                "defaults": {"unit": unit, "thresholds": steps or thresholds((None, "blue")),
                             "color": {"mode": "thresholds"}},
                "overrides": overrides or [],
            },
            "options": {
                "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
                "orientation": "auto", "percentChangeColorMode": "standard",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": fields, "values": False},
                "showPercentChange": False, "textMode": "value_and_name", "wideLayout": True,
            },
        },
    )


def table(title: str, targets: list[Json], *, w: int = 24, h: int = 9, description: str = "",
          links: list[Json] | None = None, heat: bool = False, unit: str = "short",
          overrides: list[Json] | None = None, hide: list[str] | None = None) -> Json:
    custom: Json = {"align": "auto", "filterable": True,
                    "cellOptions": {"type": "color-background" if heat else "auto"}}
    defaults: Json = {"custom": custom, "unit": unit, "links": links or []}
    if heat:
        defaults["color"] = {"mode": "continuous-GrYlRd"}
        defaults["decimals"] = 2
    return _panel(
        "table", title, description, targets, (w, h),
        {
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"cellHeight": "sm", "frameIndex": 0, "showHeader": True,
                        "footer": {"show": False, "reducer": ["sum"], "countRows": False}},
            "transformations": [{"id": "organize", "options": {
                "excludeByName": {c: True for c in hide}}}] if hide else [],
        },
    )


def bargauge(title: str, targets: list[Json], unit: str, *, w: int = 12, h: int = 8,
             description: str = "", steps: Json | None = None, max_: float | None = None) -> Json:
    defaults: Json = {"unit": unit, "min": 0, "color": {"mode": "thresholds"},
                      "thresholds": steps or thresholds((None, "blue"))}
    if max_ is not None:
        defaults["max"] = max_
    return _panel(
        "bargauge", title, description, targets, (w, h),
        {
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {
                "displayMode": "gradient", "orientation": "horizontal", "namePlacement": "auto",
                "legend": {**LEGEND, "showLegend": False},
                "maxVizHeight": 300, "minVizHeight": 16, "minVizWidth": 8,
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
                "showUnfilled": True, "sizing": "auto", "valueMode": "color",
            },
        },
    )


def barchart(title: str, targets: list[Json], unit: str, x: str, *, w: int = 12, h: int = 8,
             description: str = "") -> Json:
    return _panel(
        "barchart", title, description, targets, (w, h),
        {
            "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "palette-classic"}},
                            "overrides": []},
            "options": {
                "barWidth": 0.9, "fullHighlight": False, "groupWidth": 0.8, "legend": LEGEND,
                "orientation": "vertical", "showValue": "never", "stacking": "none",
                "tooltip": TOOLTIP, "xField": x, "xTickLabelMaxLength": 8,
                "xTickLabelRotation": 0,
            },
        },
    )


def geomap(title: str, targets: list[Json], *, w: int = 12, h: int = 14,
           description: str = "") -> Json:
    return _panel(
        "geomap", title, description, targets, (w, h),
        {
            "fieldConfig": {
                "defaults": {
                    "color": {"mode": "thresholds"},
                    "thresholds": thresholds((None, "green"), (0.5, "yellow"), (0.8, "red")),
                    "links": [NODE_LINK],
                },
                "overrides": [],
            },
            "options": {
                "basemap": {"name": "Basemap", "type": "default", "config": {}},
                "controls": {"mouseWheelZoom": True, "showAttribution": True, "showZoom": True,
                             "showScale": True},
                "layers": [{
                    "name": "Nodes (colour: latest anomaly score)",
                    "type": "markers",
                    "tooltip": True,
                    "location": {"mode": "coords", "latitude": "latitude",
                                 "longitude": "longitude"},
                    "config": {
                        "showLegend": True,
                        "style": {
                            "color": {"field": "anomaly_score", "fixed": "dark-green"},
                            "size": {"fixed": 9},
                            "symbol": {"fixed": "img/icons/marker/circle.svg", "mode": "fixed"},
                            "text": {"field": "node_id", "mode": "field"},
                            "textConfig": {"fontSize": 11, "offsetY": -12, "textAlign": "center"},
                            "opacity": 0.9,
                        },
                    },
                }],
                "tooltip": {"mode": "details"},
                "view": {"id": "fit", "allLayers": True, "padding": 20, "maxZoom": 16},
            },
        },
    )


NODE_LINK = {
    "title": "Node detail",
    "url": "/d/waterflow-node/node-detail?var-node=${__data.fields.node_id}&${__url_time_range}",
}


def variables(node_multi: bool = True, extra: list[Json] | None = None) -> Json:
    """``district`` (every district, ``none`` for nodes without one) and ``node`` within it."""
    every = {"selected": True, "text": ["All"], "value": ["$__all"]}
    district = {
        "type": "query", "name": "district", "label": "District", "datasource": PG,
        "query": "SELECT DISTINCT coalesce(district, 'none') FROM water.nodes ORDER BY 1",
        "refresh": 1, "multi": True, "includeAll": True, "current": every, "sort": 1,
        "hide": 0, "options": [],
    }
    node: Json = {
        "type": "query", "name": "node", "label": "Node", "datasource": PG,
        "query": "SELECT node_id FROM water.nodes"
                 " WHERE coalesce(district, 'none') IN ($district) ORDER BY 1",
        "refresh": 1, "multi": node_multi, "includeAll": node_multi, "sort": 1, "hide": 0,
        "options": [],
    }
    if node_multi:
        node["current"] = every
    return {"list": [district, node, *(extra or [])]}


TZ_VAR = {"type": "constant", "name": "tz", "label": "Time zone", "query": "Europe/Rome",
          "hide": 2, "skipUrlSync": True,
          "current": {"text": "Europe/Rome", "value": "Europe/Rome"}, "options": []}


def board(uid: str, title: str, description: str, panels: list[Json], *,
          node_multi: bool = True, extra_vars: list[Json] | None = None) -> Json:
    """A dashboard with panels laid out left to right in rows of 24 columns."""
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p.pop("_size")
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x += w
        row_h = max(row_h, h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-7d", "to": "now"},
        "timezone": "browser",
        "refresh": "1m",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "monday",
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "links": [{
            "title": "Waterflow boards", "type": "dashboards", "tags": [TAG], "asDropdown": True,
            "icon": "external link", "includeVars": True, "keepTime": True,
            "targetBlank": False, "tooltip": "",
        }],
        "templating": variables(node_multi, extra_vars),
        "panels": panels,
    }


# --- the boards -----------------------------------------------------------------------------

NODE_STATUS = """
    SELECT n.node_id, coalesce(n.name, n.node_id) AS name, n.district, n.role,
           n.lat AS latitude, n.lon AS longitude,
           l.ts AS last_seen, l.anomaly_score,
           CASE WHEN l.ts IS NULL OR l.ts < $__timeTo()::timestamptz - interval '1 hour'
                    THEN 'silent'
                WHEN EXISTS (SELECT 1 FROM water.anomalies a
                             WHERE a.node_id = n.node_id AND a.started_at <= $__timeTo()
                               AND (a.ended_at IS NULL
                                    OR a.ended_at >= $__timeTo()::timestamptz - interval '1 hour'))
                    THEN 'anomaly'
                ELSE 'ok' END AS status
    FROM water.nodes AS n
    LEFT JOIN LATERAL (
        SELECT r.ts, r.anomaly_score FROM water.readings AS r
        WHERE r.node_id = n.node_id AND $__timeFilter(r.ts)
        ORDER BY r.ts DESC LIMIT 1
    ) AS l ON true
    WHERE n.node_id IN ($node)
"""


#: The selected nodes' kpi_15m sums per district and time bucket of ``step`` (migrations 0009,
#: 0010): districts whose every node is selected (All, or districts picked) come from the
#: rollups, the other nodes from their own rows. One row per district and bucket, ``t`` its
#: start: a panel bucketed by the same step selects the rows as they are, without grouping them
#: again on $__timeGroup's numeric key (that grouping and its sort were most of the time of the
#: 33-36 k-point panels).
def by_district(step: str, roles: str | None = None) -> str:
    """``roles``: 'inflow' or 'not inflow' when the panel reads only those nodes' columns."""
    only = f", '{roles}'" if roles else ""
    return ("water.kpi_by_district(ARRAY[$node]::text[], $__timeFrom(), $__timeTo(),"
            f" '{step}'{only}) AS r")


def overview() -> Json:
    return board("waterflow-overview", "Network overview",
                 "Where the nodes are, which ones report, which ones look wrong.", [
        geomap("Nodes on the map", [sql("A", NODE_STATUS + """
            AND n.lat IS NOT NULL AND n.lon IS NOT NULL
            ORDER BY n.node_id""", "table")], w=12, h=16,
            description="Colour: latest anomaly score in the range (green < 0.5, red >= 0.8)."
                        " Click a node for its detail board."),
        stat("Totals in the range", [sql("A", """
            WITH k AS (
                SELECT (SELECT count(*) FROM (SELECT DISTINCT unnest(ARRAY[$node]::text[]))
                            AS s(node_id)
                        WHERE EXISTS (SELECT 1 FROM water.kpi_15m AS q
                                      WHERE q.node_id = s.node_id
                                        AND $__timeFilter(q.window_start))) AS reporting,
                       (SELECT coalesce(sum(r.n), 0) FROM {by_day})
                       -- nodes missing from water.nodes are in no district: their own rows
                       + (SELECT coalesce(sum(x.n), 0)
                          FROM (SELECT unnest(ARRAY[$node]::text[])
                                EXCEPT SELECT node_id FROM water.nodes) AS u(node_id)
                          CROSS JOIN LATERAL (
                              SELECT sum(q.n) AS n FROM water.kpi_15m AS q
                              WHERE q.node_id = u.node_id AND $__timeFilter(q.window_start)
                          ) AS x) AS readings
            ), a AS (
                SELECT count(*) FILTER (WHERE started_at <= $__timeTo()
                           AND (ended_at IS NULL OR ended_at >= $__timeFrom())) AS in_range,
                       count(*) FILTER (WHERE ended_at IS NULL) AS open
                FROM water.anomalies WHERE node_id IN ($node)
            )
            SELECT (SELECT count(*) FROM water.nodes WHERE node_id IN ($node)) AS "nodes",
                   k.reporting AS "nodes reporting", k.readings AS "readings",
                   a.in_range AS "anomaly events", a.open AS "open anomalies"
            FROM k CROSS JOIN a
            """.replace("{by_day}", by_district("1d")), "table")], w=12, h=5),
        stat("Volume into the districts (m³)", [sql("A", f"""
            SELECT coalesce(sum(r.inflow_volume), 0) AS "inflow volume"
            FROM {by_district("1d", "inflow")}
            """, "table")], "m3", w=6, h=5),
        stat("Open anomalies", [sql("A", """
            SELECT count(*) AS "open" FROM water.anomalies
            WHERE node_id IN ($node) AND ended_at IS NULL
            """, "table")], w=6, h=5, steps=thresholds((None, "green"), (1, "red"))),
        timeseries("Readings per interval by district", [sql("A", f"""
            SELECT $__timeGroupAlias(r.t, $__interval), r.district AS metric,
                   r.n::numeric AS value
            FROM {by_district("$__interval")}
            ORDER BY r.t
            """)], w=12, h=6, bars=True, stack=True, interval="15m"),
        table("Node status", [sql("A", "SELECT * FROM (" + NODE_STATUS + """) AS s
            ORDER BY CASE s.status WHEN 'anomaly' THEN 0 WHEN 'silent' THEN 1 ELSE 2 END,
                     s.district NULLS LAST, s.node_id""",
                                  "table")], h=10, links=[NODE_LINK],
              hide=["latitude", "longitude"],
              description="silent: no reading in the last hour of the range; anomaly: an event"
                          " open (or ended) in that hour."),
    ])


def node_detail() -> Json:
    node = "${node:sqlstring}"
    return board("waterflow-node", "Node detail",
                 "One node: its raw readings, the 15-minute band, its anomaly score, events"
                 " and forecast.", [
        stat("This node in the range", [sql("A", f"""
            SELECT max(window_start + interval '15 minutes') AS "last window",
                   sum(n) AS "readings", avg(completeness) AS "completeness",
                   avg(quality_avg) AS "quality", max(score_max) AS "peak score"
            FROM water.kpi_15m WHERE node_id = {node} AND $__timeFilter(window_start)
            """, "table")], w=24, h=4, fields="/.*/", overrides=[
            {"matcher": {"id": "byName", "options": "last window"},
             "properties": [{"id": "unit", "value": "dateTimeAsLocal"}]}]),
        timeseries("Raw readings", [sql("A", f"""
            SELECT r.ts AS "time", m.name AS metric, m.value
            FROM water.readings AS r
            CROSS JOIN LATERAL (VALUES ('flow_rate L/s', r.flow_rate),
                ('pressure bar', r.pressure), ('level m', r.level),
                ('chlorine mg/L', r.chlorine), ('turbidity NTU', r.turbidity),
                ('ph', r.ph), ('temperature °C', r.temperature)) AS m(name, value)
            WHERE r.node_id = {node} AND $__timeFilter(r.ts) AND m.value IS NOT NULL
            ORDER BY 1
            """)], w=24, h=8,
            description="Every accepted reading, each measurement the node reports."),
        timeseries("Flow: 15-minute average and min/max band (L/s)", [sql("A", f"""
            SELECT window_start AS "time", flow_rate_min AS "min", flow_rate_avg AS "avg",
                   flow_rate_max AS "max"
            FROM water.kpi_15m WHERE node_id = {node} AND $__timeFilter(window_start)
            ORDER BY 1
            """)], "flowlps", overrides=BAND_OVERRIDES),
        timeseries("Pressure: 15-minute average and min/max band (bar)", [sql("A", f"""
            SELECT window_start AS "time", pressure_min AS "min", pressure_avg AS "avg",
                   pressure_max AS "max"
            FROM water.kpi_15m WHERE node_id = {node} AND $__timeFilter(window_start)
            ORDER BY 1
            """)], "pressurebar", overrides=BAND_OVERRIDES),
        timeseries("Anomaly score (max per interval)", [sql("A", f"""
            SELECT $__timeGroupAlias(ts, $__interval), max(anomaly_score) AS "score"
            FROM water.readings WHERE node_id = {node} AND $__timeFilter(ts)
            GROUP BY 1 ORDER BY 1
            """)], "none", limits=thresholds((None, "green"), (0.8, "red")), min_=0),
        timeseries("Forecast vs actual (hourly flow, L/s)", [
            sql("A", f"""
            SELECT $__timeGroupAlias(window_start, 1h), avg(flow_rate_avg) AS "actual"
            FROM water.kpi_15m WHERE node_id = {node} AND $__timeFilter(window_start)
            GROUP BY 1 ORDER BY 1
            """),
            sql("B", f"""
            SELECT DISTINCT ON (target_ts) target_ts AS "time", yhat AS "forecast",
                   yhat_lo AS "forecast low", yhat_hi AS "forecast high"
            FROM water.forecast_selected
            WHERE node_id = {node} AND $__timeFilter(target_ts) AND issued_at <= target_ts
              AND issued_at <= $__timeTo()
              AND issued_at > $__timeFrom()::timestamptz - interval '7 days'
            ORDER BY target_ts, issued_at DESC
            """)], "flowlps",
            description="The forecast of the selected model, as last issued before each hour."),
        table("Anomaly events of this node", [sql("A", f"""
            SELECT started_at, ended_at, kind, measurement, round(peak_score::numeric, 3)
                   AS peak_score, expected_lo, expected_hi, observed
            FROM water.anomalies
            WHERE node_id = {node} AND started_at <= $__timeTo()
              AND (ended_at IS NULL OR ended_at >= $__timeFrom())
            ORDER BY started_at DESC
            """, "table")], h=8),
    ], node_multi=False)


BAND_OVERRIDES = [
    {"matcher": {"id": "byName", "options": "min"},
     "properties": [{"id": "custom.fillBelowTo", "value": "max"},
                    {"id": "custom.lineWidth", "value": 0},
                    {"id": "custom.fillOpacity", "value": 20}]},
    {"matcher": {"id": "byName", "options": "max"},
     "properties": [{"id": "custom.lineWidth", "value": 0}]},
]

ANOMALIES_IN_RANGE = """
    FROM water.anomalies AS a JOIN water.nodes AS n USING (node_id)
    WHERE a.node_id IN ($node) AND a.started_at <= $__timeTo()
      AND (a.ended_at IS NULL OR a.ended_at >= $__timeFrom())
"""


def anomalies() -> Json:
    return board("waterflow-anomalies", "Anomalies",
                 "Anomaly events (one per incident): when, where, what kind, how strong.", [
        stat("Events in the range", [sql("A", f"""
            SELECT count(*) AS "events", count(*) FILTER (WHERE a.ended_at IS NULL) AS "open",
                   count(DISTINCT a.node_id) AS "nodes affected",
                   max(a.peak_score) AS "highest peak score"
            {ANOMALIES_IN_RANGE}""", "table")], w=24, h=4),
        timeseries("Timeline: events starting per interval, by kind", [sql("A", """
            SELECT $__timeGroupAlias(started_at, $__interval), kind AS metric, count(*) AS value
            FROM water.anomalies
            WHERE node_id IN ($node) AND $__timeFilter(started_at)
            GROUP BY 1, 2 ORDER BY 1
            """)], w=16, bars=True, stack=True, interval="1h"),
        bargauge("Events by node", [sql("A", f"""
            SELECT a.node_id, count(*) AS events {ANOMALIES_IN_RANGE}
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 15""", "table")], "short", w=8),
        table("Anomaly events", [sql("A", f"""
            SELECT a.started_at, a.ended_at,
                   coalesce(a.ended_at, $__timeTo()::timestamptz) - a.started_at AS duration,
                   a.node_id, n.district, a.kind, a.measurement,
                   round(a.peak_score::numeric, 3) AS peak_score,
                   round(a.expected_lo::numeric, 3) AS expected_lo,
                   round(a.expected_hi::numeric, 3) AS expected_hi,
                   round(a.observed::numeric, 3) AS observed
            {ANOMALIES_IN_RANGE}
            ORDER BY a.started_at DESC LIMIT 500""", "table")], h=12, links=[NODE_LINK]),
    ])


#: The daily rows of the selected districts' balance in the time range.
DISTRICT_DAYS = "b.period = 'day' AND b.district IN ($district) AND $__timeFilter(b.period_start)"


def district_days(column: str) -> str:
    """One daily column of the district balance as a time series per district."""
    return f"""
            SELECT b.period_start AS "time", b.district AS metric, b.{column} AS value
            FROM water.district_balance AS b
            WHERE {DISTRICT_DAYS}
            ORDER BY 1
            """


def balance() -> Json:
    day = DISTRICT_DAYS
    return board("waterflow-balance", "Water balance and efficiency",
                 "District water balance (system input vs consumption), losses, non-revenue"
                 " water, how much of it was estimated, the infrastructure leakage index, and"
                 " the minimum night flow of each district and node.", [
        timeseries("District system input vs consumption (m³ per day)", [sql("A", f"""
            SELECT b.period_start AS "time", b.district || ' ' || v.name AS metric, v.value
            FROM water.district_balance AS b
            CROSS JOIN LATERAL (VALUES ('system input', b.system_input_m3),
                                       ('consumption', b.consumption_m3)) AS v(name, value)
            WHERE {day}
            ORDER BY 1
            """)], "m3", points=True,
            description="System input = inflow meters minus outflow meters (water exported to"
                        " other districts)."),
        timeseries("Losses (m³ per day)", [sql("A", district_days("loss_m3"))],
            "m3", points=True,
            description="System input minus consumption, with gaps and untrusted stretches of"
                        " the meters filled from each meter's own pattern."),
        timeseries("Non-revenue water share, daily", [sql("A", district_days("nrw"))],
            "percentunit", points=True,
            limits=thresholds((None, "green"), (0.2, "orange"), (0.3, "red")),
            description="Losses / system input; above 20 % deserves a look."),
        bargauge("Non-revenue water over the range", [sql("A", f"""
            SELECT b.district, sum(b.loss_m3) / nullif(sum(b.system_input_m3), 0) AS nrw
            FROM water.district_balance AS b
            WHERE {day}
            GROUP BY 1 ORDER BY 1
            """, "table")], "percentunit",
            steps=thresholds((None, "green"), (0.2, "orange"), (0.3, "red")), max_=0.5),
        timeseries("Balance hour by hour (m³ per hour)", [sql("A", """
            SELECT b.period_start AS "time", b.district || ' ' || v.name AS metric, v.value
            FROM water.district_balance AS b
            CROSS JOIN LATERAL (VALUES ('system input', b.system_input_m3),
                                       ('consumption', b.consumption_m3),
                                       ('losses', b.loss_m3)) AS v(name, value)
            WHERE b.period = 'hour' AND b.district IN ($district)
              AND $__timeFilter(b.period_start)
            ORDER BY 1
            """)], "m3", w=24),
        timeseries("Estimated share of the metered volume, daily",
                   [sql("A", district_days("filled_share"))],
            "percentunit", points=True, min_=0,
            limits=thresholds((None, "green"), (0.2, "orange"), (0.5, "red")),
            description="Volume filled from the meters' own patterns (silent, stuck or flagged"
                        " meters). Over 50 % the day's balance is marked estimated."),
        table("Days whose balance rests on estimates", [sql("A", f"""
            SELECT b.period_start AS day, b.district, b.filled_share, b.system_input_m3,
                   b.consumption_m3, b.loss_m3, b.nrw, b.estimated
            FROM water.district_balance AS b
            WHERE {day}
            ORDER BY b.filled_share DESC NULLS LAST, b.period_start DESC LIMIT 50
            """, "table")], w=12, h=8,
            description="Most estimated days first; 'estimated' is true above a 50 % share."),
        timeseries("District minimum night flow and its baseline (L/s)", [sql("A", f"""
            SELECT b.period_start AS "time", b.district || ' ' || v.name AS metric, v.value
            FROM water.district_balance AS b
            CROSS JOIN LATERAL (VALUES ('MNF', b.mnf_lps),
                                       ('baseline', b.mnf_baseline_lps)) AS v(name, value)
            WHERE {day}
            ORDER BY 1
            """)], "flowlps", points=True,
            description="Lowest hourly system input between 02:00 and 05:00 local, against the"
                        " median of the district's earlier clean nights of the same day type."),
        bargauge("Night flow trend over the last 30 nights (L/s per day)", [sql("A", f"""
            SELECT DISTINCT ON (b.district) b.district,
                   b.mnf_trend_lps_per_day AS trend
            FROM water.district_balance AS b
            WHERE {day}
            ORDER BY b.district, b.period_start DESC
            """, "table")], "flowlps",
            steps=thresholds((None, "green"), (0.02, "orange"), (0.05, "red")),
            description="Least-squares slope of the district's MNF, latest day in the range:"
                        " a steady rise is a growing leak."),
        timeseries("Estimated leak rate while a leak is suspected (L/s)",
                   [sql("A", district_days("leak_lps"))],
            "flowlps", bars=True, min_=0,
            description="MNF above its baseline on the nights of a LeakSuspected district event"
                        " (anomalies with node = district, measurement 'mnf')."),
        timeseries("Infrastructure leakage index, daily", [sql("A", district_days("ili"))],
            "short", points=True, min_=0,
            limits=thresholds((None, "green"), (2, "orange"), (4, "red")),
            description="Real losses / unavoidable real losses (IWA), with mains length and"
                        " service connections from the network file (empty without them) and"
                        " the day's average pressure of the district's loggers."),
        stat("Leakage index over the range", [sql("A", f"""
            SELECT b.district, avg(b.ili) AS ili, avg(b.pressure_m) AS pressure_m
            FROM water.district_balance AS b
            WHERE {day}
            GROUP BY 1 ORDER BY 1
            """, "table")], "short", fields="/^ili$/",
            steps=thresholds((None, "green"), (2, "orange"), (4, "red"))),
        timeseries("Minimum night flow of the nodes, daily (L/s)", [sql("A", """
            SELECT k.day AS "time", k.node_id AS metric, k.mnf AS value
            FROM water.kpi_daily AS k JOIN water.nodes AS n USING (node_id)
            WHERE k.node_id IN ($node) AND $__timeFilter(k.day) AND k.mnf IS NOT NULL
              AND n.role IS DISTINCT FROM 'consumption'
            ORDER BY 1
            """)], "flowlps", points=True,
            description="Minimum night flow of inflow meters (and of nodes without a role): a"
                        " rising trend is the classic sign of a growing leak."),
        table("Node night flow: the last 30 days' trend", [sql("A", """
            SELECT k.node_id, count(k.mnf) AS nights,
                   round(avg(k.mnf)::numeric, 3) AS "mean MNF (L/s)",
                   round((regr_slope(k.mnf, k.day - DATE '2000-01-01'))::numeric, 4)
                       AS "trend (L/s per day)"
            FROM water.kpi_daily AS k JOIN water.nodes AS n USING (node_id)
            WHERE k.node_id IN ($node) AND k.mnf IS NOT NULL
              AND n.role IS DISTINCT FROM 'consumption'
              AND k.day > $__timeTo()::date - 30 AND k.day <= $__timeTo()::date
            GROUP BY 1 ORDER BY 4 DESC NULLS LAST
            """, "table")], w=12, h=8,
            description="Least-squares slope of each node's daily minimum night flow over the"
                        " 30 days up to the end of the range: a positive slope that lasts is a"
                        " leak growing downstream of the meter."),
        timeseries("Pressure compliance, daily", [sql("A", """
            SELECT day AS "time", node_id AS metric, pressure_compliance AS value
            FROM water.kpi_daily
            WHERE node_id IN ($node) AND $__timeFilter(day)
              AND pressure_compliance IS NOT NULL
            ORDER BY 1
            """)], "percentunit", points=True,
            limits=thresholds((None, "red"), (0.95, "green")),
            description="Share of readings inside the node's service pressure band."),
    ])


WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def consumption() -> Json:
    hours = ",\n".join(
        f'max(flow) FILTER (WHERE h = {h}) AS "{h:02d}"' for h in range(24))
    days = " ".join(f"WHEN {i + 1} THEN '{d}'" for i, d in enumerate(WEEKDAYS))
    local = "f.t AT TIME ZONE '${tz}'"
    # The flow of the nodes that are not inflow meters, per UTC hour over the districts (exact
    # for local time in a zone whose UTC offset is whole hours, as Europe/Rome's); converted to
    # local time once per hour, not once per district and hour.
    flow_hours = f"""
            FROM (SELECT r.t, sum(r.flow_sum) AS flow_sum, sum(r.flow_n) AS flow_n
                  FROM {by_district("1h", "not inflow")}
                  WHERE r.flow_n > 0 GROUP BY r.t) AS f"""
    return board("waterflow-consumption", "Consumption patterns",
                 "When water is used: each district's hour-of-week pattern and daily peak"
                 " (from its hourly balance), and per node hour of the week, weekday vs"
                 " weekend, daily volumes (consumption meters and nodes without a role).", [
        table("Hour of week: average flow per node (L/s), local time", [sql("A", f"""
            WITH w AS (
                SELECT extract(isodow FROM {local})::int AS dow,
                       extract(hour FROM {local})::int AS h,
                       sum(f.flow_sum) / sum(f.flow_n) AS flow
                {flow_hours}
                GROUP BY 1, 2
            )
            SELECT CASE dow {days} END AS day,
            {hours}
            FROM w GROUP BY dow ORDER BY dow
            """, "table")], h=9, heat=True, unit="flowlps"),
        barchart("Daily profile: weekdays vs weekend (L/s per node)", [sql("A", f"""
            SELECT lpad(extract(hour FROM {local})::int::text, 2, '0') AS hour,
                   sum(f.flow_sum) FILTER (WHERE extract(isodow FROM {local}) < 6)
                       / sum(f.flow_n) FILTER (WHERE extract(isodow FROM {local}) < 6)
                       AS weekday,
                   sum(f.flow_sum) FILTER (WHERE extract(isodow FROM {local}) >= 6)
                       / sum(f.flow_n) FILTER (WHERE extract(isodow FROM {local}) >= 6)
                       AS weekend
            {flow_hours}
            GROUP BY 1 ORDER BY 1""", "table")], "flowlps", "hour"),
        table("District hour of week: system input (L/s), local time", [sql("A", f"""
            WITH w AS (
                SELECT b.district,
                       extract(isodow FROM b.period_start AT TIME ZONE '${{tz}}')::int AS dow,
                       extract(hour FROM b.period_start AT TIME ZONE '${{tz}}')::int AS h,
                       avg(b.system_input_m3 / 3.6) AS flow
                FROM water.district_balance AS b
                WHERE b.period = 'hour' AND b.district IN ($district)
                  AND $__timeFilter(b.period_start)
                GROUP BY 1, 2, 3
            )
            SELECT district, CASE dow {days} END AS day,
            {hours}
            FROM w GROUP BY district, dow ORDER BY district, dow
            """, "table")], h=10, heat=True, unit="flowlps",
            description="The district's demand pattern from its hourly balance (inflow minus"
                        " outflow, gaps filled), averaged over the range."),
        timeseries("Daily peak hour by district (local)", [sql("A", district_days("peak_hour"))],
            "short", points=True, min_=0,
            description="Local hour of the day's highest hourly system input."),
        timeseries("Daily peak flow by district (L/s)", [sql("A", district_days("peak_lps"))],
            "flowlps", points=True,
            description="Mean flow of the day's peak hour: the design load of the district."),
        timeseries("Daily volume by district (m³)", [sql("A", """
            SELECT k.day AS "time", coalesce(n.district, 'none') AS metric,
                   sum(k.volume_m3) AS value
            FROM water.kpi_daily AS k JOIN water.nodes AS n USING (node_id)
            WHERE k.node_id IN ($node) AND $__timeFilter(k.day) AND k.volume_m3 IS NOT NULL
              AND n.role IS DISTINCT FROM 'inflow'
            GROUP BY 1, 2 ORDER BY 1
            """)], "m3", bars=True),
        timeseries("Flow by district (consumption meters, L/s)", [sql("A", f"""
            SELECT $__timeGroupAlias(r.t, $__interval), r.district AS metric,
                   r.flow_sum / r.flow_windows AS value
            FROM {by_district("$__interval", "not inflow")}
            WHERE r.flow_n > 0
            ORDER BY r.t""")], "flowlps", w=24, interval="15m",
            description="Sum of the selected nodes' flows, averaged over each interval; pick"
                        " nodes to compare them."),
    ], extra_vars=[TZ_VAR])


def quality() -> Json:
    panels = []
    for col, (name, unit, lo, hi) in QUALITY_LIMITS.items():
        steps: list[tuple[float | None, str]] = [(None, "red" if lo is not None else "green")]
        if lo is not None:
            steps.append((lo, "green"))
        if hi is not None:
            steps.append((hi, "red"))
        band = " - ".join(str(v) for v in (lo, hi) if v is not None)
        panels.append(timeseries(
            f"{name} ({'limit ' if lo is None else 'band '}{band})", [sql("A", f"""
            SELECT $__timeGroupAlias(window_start, $__interval), node_id AS metric,
                   avg({col}_avg) AS value
            FROM water.kpi_15m
            WHERE node_id IN ($node) AND $__timeFilter(window_start) AND {col}_avg IS NOT NULL
            GROUP BY 1, 2 ORDER BY 1
            """)], unit, limits=thresholds(*steps), interval="15m"))
    checks = []
    for col, (_name, _unit, lo, hi) in QUALITY_LIMITS.items():
        conds = [f"{col}_min < {lo}" if lo is not None else "", f"{col}_max > {hi}"
                 if hi is not None else ""]
        cond = " OR ".join(c for c in conds if c)
        checks.append(f'avg(CASE WHEN {cond} THEN 1.0 WHEN {col}_avg IS NOT NULL THEN 0.0 END)'
                      f' AS "{col}"')
    panels.append(table("Share of 15-minute windows outside the limits, by node", [sql("A", """
        SELECT node_id, count(*) AS windows,
        {checks}
        FROM water.kpi_15m
        WHERE node_id IN ($node) AND $__timeFilter(window_start)
          AND (chlorine_avg IS NOT NULL OR ph_avg IS NOT NULL OR turbidity_avg IS NOT NULL
               OR conductivity_avg IS NOT NULL)
        GROUP BY 1 ORDER BY 1
        """.replace("{checks}", ",\n        ".join(checks)), "table")], w=12, h=8,
        unit="percentunit"))
    panels.append(timeseries(
        "Compliance with the drinking-water limits, per node and day", [sql("A", """
        SELECT day::timestamp AS "time", node_id AS metric,
               water_quality_compliance AS value
        FROM water.kpi_daily
        WHERE node_id IN ($node) AND water_quality_compliance IS NOT NULL
          AND day BETWEEN $__timeFrom()::date - 1 AND $__timeTo()::date
        ORDER BY 1
        """)], "percentunit", w=24, bars=True, min_=0, description=(
            "Share of the node's readings whose water-quality values are all within the limits"
            " of the network file (its own, or the defaults: EU Drinking Water Directive"
            " 2020/2184 for pH, conductivity and turbidity; chlorine 0.2-1.0 mg/L),"
            " kpi_daily.water_quality_compliance.")))
    return board("waterflow-quality", "Water quality",
                 "Chlorine, pH, turbidity, conductivity and temperature of the quality probes"
                 " against their limits (shaded red outside).", panels)


#: Forecast series of the selection: the chosen nodes, and the chosen districts (a district's
#: demand is forecast under node_id = the district id, dataflows/forecast.py).
FORECAST_SERIES = "(node_id IN ($node) OR node_id IN ($district))"

#: The latest issue of each series: one probe of the forecasts key per series (a GROUP BY over
#: the series' rows read every hour of every issue kept: seconds at a year, bench/README.md).
LATEST_ISSUE = """
    WITH latest AS (
        SELECT s.node_id,
               (SELECT max(f.issued_at) FROM water.forecasts AS f
                WHERE f.node_id = s.node_id AND f.issued_at <= $__timeTo()) AS issued_at
        FROM unnest(ARRAY[$node, $district]::text[]) AS s(node_id)
    )
"""


def forecasts() -> Json:
    return board("waterflow-forecasts", "Forecasts and accuracy",
                 "Hourly demand forecasts (7 days ahead, issued daily at 00:00 local time) of the"
                 " chosen nodes and districts, the model chosen per series, and how accurate each"
                 " model has been.", [
        table("Next 7 days: forecast daily volume (m³), latest issue", [sql("A", LATEST_ISSUE + """
            SELECT s.node_id, s.model, date_trunc('day', s.target_ts AT TIME ZONE '${tz}') AS day,
                   round(sum(s.yhat) * 3.6) AS "forecast m3",
                   round(sum(s.yhat_lo) * 3.6) AS "low m3", round(sum(s.yhat_hi) * 3.6) AS "high m3"
            FROM water.forecast_selected AS s JOIN latest USING (node_id, issued_at)
            GROUP BY 1, 2, 3 ORDER BY 1, 3
            """, "table")], w=12, h=10),
        table("Model chosen at the latest issue, and each model's MAE in the selection window",
              [sql("A", LATEST_ISSUE + """
            , chosen AS (
                SELECT DISTINCT s.node_id, s.issued_at, s.model
                FROM water.forecast_selected AS s JOIN latest USING (node_id, issued_at)
            )
            SELECT c.node_id, c.issued_at, c.model AS chosen, a.model,
                   round((sum(a.mae * a.n) / nullif(sum(a.n), 0))::numeric, 3) AS "MAE L/s",
                   sum(a.n) AS hours
            FROM chosen AS c
            LEFT JOIN water.forecast_accuracy AS a
              ON a.node_id = c.node_id AND a.period_start < c.issued_at
             AND a.period_start
                 >= c.issued_at - (SELECT selection_window FROM water.forecast_settings)
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 5
            """, "table")], w=12, h=10,
              description="forecast_selected picks per series the model with the lowest MAE over"
                          " the accuracy of the selection window (water.forecast_settings) before"
                          " the issue."),
        timeseries("Forecast vs actual in the range (hourly flow, L/s, all selected nodes)", [
            sql("A", """
            SELECT $__timeGroupAlias(window_start, 1h),
                   sum(flow_rate_avg) / count(DISTINCT window_start) AS "actual"
            FROM water.kpi_15m
            WHERE node_id IN (SELECT s.node_id FROM unnest(ARRAY[$node]::text[]) AS s(node_id)
                              WHERE EXISTS (SELECT 1 FROM water.forecasts AS f
                                            WHERE f.node_id = s.node_id))
              AND $__timeFilter(window_start)
            GROUP BY 1 ORDER BY 1
            """),
            sql("B", """
            SELECT f.target_ts AS "time", sum(f.yhat) AS "forecast"
            FROM (SELECT DISTINCT ON (node_id, target_ts) node_id, target_ts, yhat
                  FROM water.forecast_selected
                  WHERE node_id IN ($node) AND $__timeFilter(target_ts)
                    AND issued_at <= target_ts AND issued_at <= $__timeTo()
                    AND issued_at > $__timeFrom()::timestamptz - interval '7 days'
                  ORDER BY node_id, target_ts, issued_at DESC) AS f
            GROUP BY 1 ORDER BY 1
            """)], "flowlps", w=12, h=10),
        timeseries("Mean absolute percentage error by model", [sql("A", """
            SELECT period_start AS "time", model AS metric,
                   sum(mape * n) / nullif(sum(n), 0) AS value
            FROM water.forecast_accuracy
            WHERE {series} AND $__timeFilter(period_start)
            GROUP BY 1, 2 ORDER BY 1
            """.replace("{series}", FORECAST_SERIES))], "percentunit"),
        table("Accuracy by series, model and horizon (horizon_h: 24 = 1-24 h, 72 = 25-72 h,"
              " 168 = 73-168 h)", [sql("A", """
            SELECT node_id, model, horizon_h, sum(n) AS n,
                   round((sum(mae * n) / nullif(sum(n), 0))::numeric, 3) AS mae,
                   round((sum(mape * n) / nullif(sum(n), 0))::numeric, 4) AS mape
            FROM water.forecast_accuracy
            WHERE {series} AND $__timeFilter(period_start)
            GROUP BY 1, 2, 3 ORDER BY 1, 3, 5
            """.replace("{series}", FORECAST_SERIES), "table")], w=12, h=8),
    ], extra_vars=[TZ_VAR])


def data_quality() -> Json:
    return board("waterflow-data-quality", "Data quality",
                 "Is the data complete and trustworthy: completeness, quality, flags,"
                 " quarantined readings by reason, and the ingest runs.", [
        timeseries("Completeness by district (15-minute windows)", [sql("A", f"""
            SELECT $__timeGroupAlias(r.t, $__interval), r.district AS metric,
                   r.completeness_sum / nullif(r.completeness_n, 0) AS value
            FROM {by_district("$__interval")}
            ORDER BY r.t
            """)], "percentunit", interval="1h",
            limits=thresholds((None, "red"), (0.9, "green"))),
        timeseries("Quarantined readings by reason", [sql("A", """
            WITH q AS (SELECT coalesce(ts, received_at) AS event_ts, reason
                       FROM water.quarantine)
            SELECT $__timeGroupAlias(event_ts, $__interval), reason AS metric,
                   count(*) AS value
            FROM q WHERE $__timeFilter(event_ts)
            GROUP BY 1, 2 ORDER BY 1
            """)], bars=True, stack=True, interval="1h",
            description="By the reading's own time (arrival time when it had none); every"
                        " source, also readings of unknown nodes."),
        timeseries("Accepted readings with a flag, by flag", [sql("A", """
            SELECT $__timeGroupAlias(r.ts, $__interval), f.flag AS metric, count(*) AS value
            FROM water.readings AS r CROSS JOIN LATERAL unnest(r.flags) AS f(flag)
            WHERE r.node_id IN ($node) AND $__timeFilter(r.ts)
              AND cardinality(r.flags) > 0  -- changes no row; the partial index of 0008
            GROUP BY 1, 2 ORDER BY 1
            """)], bars=True, stack=True, interval="1h"),
        table("Completeness and quality by node", [sql("A", """
            SELECT k.node_id, count(*) AS days,
                   round(avg(k.completeness)::numeric, 3) AS completeness,
                   round(min(k.completeness)::numeric, 3) AS worst_day,
                   sum(k.n) AS readings
            FROM water.kpi_daily AS k
            WHERE k.node_id IN ($node) AND $__timeFilter(k.day)
            GROUP BY 1 ORDER BY 3, 1
            """, "table")], w=12, h=8, links=[NODE_LINK]),
        table("Quarantine reasons in the range", [sql("A", """
            WITH q AS (SELECT coalesce(ts, received_at) AS event_ts, reason, source, raw
                       FROM water.quarantine)
            SELECT reason, count(*) AS records, count(DISTINCT source) AS sources,
                   min(raw) AS example
            FROM q WHERE $__timeFilter(event_ts)
            GROUP BY 1 ORDER BY 2 DESC
            """, "table")], w=12, h=8),
        table("Ingest runs (latest 20, whatever the range)", [sql("A", """
            SELECT run_id, started_at, finished_at - started_at AS duration, source, rows_in,
                   accepted, quarantined, duplicates, values_quarantined, late,
                   rows_in = accepted + quarantined + duplicates AS reconciled
            FROM water.ingest_runs ORDER BY started_at DESC LIMIT 20
            """, "table")], h=7,
            description="Runs are listed by wall-clock time, so a replay of old data shows"
                        " here whatever the range."),
    ])


RATE = "[$__rate_interval]"


def pipeline() -> Json:
    return board("waterflow-pipeline", "Pipeline health",
                 "The dataflow itself, from Prometheus: throughput by outcome, quarantine,"
                 " sinks, lags.", [
        timeseries("Readings per second by outcome", [prom("A", f"""
            sum by (outcome) (rate(waterflow_readings_total{RATE}))""", "{{outcome}}")],
            "reqps", stack=True),
        timeseries("Quarantined share of readings", [prom("A", f"""
            sum(rate(waterflow_readings_total{{outcome="quarantined"}}{RATE}))
            / clamp_min(sum(rate(waterflow_readings_total{RATE})), 1e-9)""", "quarantined")],
            "percentunit", limits=thresholds((None, "green"), (0.05, "red"))),
        timeseries("Quarantine records per second by reason", [prom("A", f"""
            sum by (reason) (rate(waterflow_quarantine_records_total{RATE}))""", "{{reason}}")],
            "reqps", bars=True, stack=True),
        timeseries("Late readings per second", [prom("A", f"""
            sum(rate(waterflow_late_readings_total{RATE}))""", "late")], "reqps"),
        timeseries("Sink rows per second by tier and table", [prom("A", f"""
            sum by (tier, table) (rate(waterflow_sink_rows_total{RATE}))""",
            "{{tier}} {{table}}")], "reqps"),
        timeseries("Sink errors per second by tier", [prom("A", f"""
            sum by (tier) (rate(waterflow_sink_errors_total{RATE}))""", "{{tier}}")],
            "reqps", limits=thresholds((None, "green"), (0.001, "red"))),
        timeseries("Sink write latency (p50, p95)", [
            prom("A", f"""histogram_quantile(0.5, sum by (tier, le)
                (rate(waterflow_sink_write_seconds_bucket{RATE})))""", "{{tier}} p50"),
            prom("B", f"""histogram_quantile(0.95, sum by (tier, le)
                (rate(waterflow_sink_write_seconds_bucket{RATE})))""", "{{tier}} p95")], "s"),
        timeseries("Event-time lag and time since the last batch", [
            prom("A", "max(waterflow_event_time_lag_seconds)", "event-time lag"),
            prom("B", "time() - max(waterflow_last_batch_timestamp_seconds)",
                 "since last batch")], "s"),
        timeseries("Nodes silent for over 15 minutes", [prom("A", """
            count(time() - waterflow_node_last_reading_timestamp_seconds{node_id=~"$node"} > 900)
            or vector(0)""", "silent nodes")], "short", min_=0),
        timeseries("Active anomalies by kind", [prom("A", """
            sum by (kind) (waterflow_active_anomalies{node_id=~"$node"})""", "{{kind}}")],
            "short", stack=True, min_=0),
    ])


BOARDS = {
    "network-overview": overview,
    "node-detail": node_detail,
    "anomalies": anomalies,
    "water-balance": balance,
    "consumption-patterns": consumption,
    "water-quality": quality,
    "forecasts": forecasts,
    "data-quality": data_quality,
    "pipeline-health": pipeline,
}


def render() -> dict[str, str]:
    """File name -> the JSON text of each board."""
    return {f"{name}.json": json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False)
            + "\n" for name, build in BOARDS.items()}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    texts = render()
    for stale in set(p.name for p in OUT.glob("*.json")) - set(texts):
        (OUT / stale).unlink()
    for name, text_ in texts.items():
        (OUT / name).write_text(text_, encoding="utf-8")
    print(f"wrote {len(texts)} boards to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
