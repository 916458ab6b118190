"""Hostile node ids, headers and Kafka keys are data: stored verbatim, or quarantined with a reason.

A replay of ``tests/data/hostile_canonical.csv`` plus files made here (ids carrying SQL, Redis
commands, shell, format strings, Unicode, the longest id allowed and one past it, control
characters; a wide file whose headers carry the same), and a live run of the same ids published
to the broker with hostile keys, go into a fresh PostgreSQL database and a Redis key prefix of
their own. Every id comes back as given, byte for byte, from the warm tier, the hot tier's keys
and the Parquet archive; the ids no reader may accept are quarantined as ``parse_error``; every
table and the prefix's other keys are still there.

Last, the connectors' SQL is checked in the source: every ``execute``/``copy`` takes a constant
or a ``psycopg.sql`` composition, never text formatted with values.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl
import psycopg
import pytest

from connectors.kafka import KafkaConfig, ensure_topic
from connectors.kafka_publish import Message, publish
from dataflows.cli import main
from tests.integration.conftest import REDIS_URL, fresh_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
HOSTILE_FILE = ROOT / "tests" / "data" / "hostile_canonical.csv"

#: Ids every reader must keep as they are (the id of ``hostile_canonical.csv`` too).
VERBATIM = [
    "x'); DROP TABLE water.readings; --",
    "x'; DROP TABLE water.readings;--",  # hostile_canonical.csv's
    "\\'; SELECT pg_sleep(30); --",
    '"; FLUSHALL',
    "$(rm -rf /)",
    "`reboot`",
    "a:b:*",
    "[x]?*{}",
    "%s%n{0}${jndi:ldap://127.0.0.1/x}",
    "水道-ノード-💧",
    "\u202eevil",  # right-to-left override
    "e\u0301-combining",
    "x" * 200,  # the longest id allowed (MAX_NODE_ID characters)
    "水" * 200,  # as many characters, three bytes each
]
#: Ids no reader may accept: too long, or holding a control character.
UNREADABLE = ["y" * 201, "nul\x00byte", "tab\tid", "bell\x07"]
#: More, for JSON only: a CSV reader ends a line at CR or LF even inside quotes.
UNREADABLE_JSON = ["cr\rid", "new\nline"]
#: Wide-file headers: the header is the node's name; its id is the header's slug.
HEADERS = {
    "x'); DROP TABLE water.readings; --": "x-drop-table-water-readings",
    "; FLUSHALL": "flushall",
    "$(rm -rf /)": "rm-rf",
    "水道 💧": "node-c2dbefff3e",  # nothing readable: a hash of the name, stable across runs
    "nul\x00hdr": "nul-hdr",
}
#: A NUL is kept as the four characters \x00 (PostgreSQL text cannot hold one).
def warm_text(text: str) -> str:
    return text.replace("\x00", "\\x00")


TABLES = ("nodes", "readings", "kpi_15m", "kpi_daily", "anomalies", "quarantine",
          "district_balance", "ingest_runs", "schema_migrations")


def _csv_line(node: str, flow: float) -> str:
    return f'"{node.replace(chr(34), chr(34) * 2)}",2024-11-13T06:00:00+01:00,{flow},3.0\n'


def flow_of(i: int) -> float:
    return 1.0 + i / 8  # exact in binary: compared with ==


def write_inputs(folder: Path) -> Path:
    """The hostile files of this test, beside a copy of tests/data/hostile_canonical.csv."""
    folder.mkdir()
    shutil.copy(HOSTILE_FILE, folder)
    ids = [n for n in VERBATIM if n != "x'; DROP TABLE water.readings;--"] + UNREADABLE
    with (folder / "hostile_ids.csv").open("w", encoding="utf-8", newline="") as f:
        f.write("node_id,timestamp,flow_rate,pressure\n")
        for i, node in enumerate(ids):
            f.write(_csv_line(node, flow_of(i)))
    with (folder / "REPORT_HOSTILE_HEADERS.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["TIMESTAMP", *(f"{h} (L/s)" for h in HEADERS)])
        w.writerow(["2024-11-13 06:00", *(flow_of(i) for i in range(len(HEADERS)))])
    return folder


def expected_flows() -> dict[str, float]:
    ids = [n for n in VERBATIM if n != "x'; DROP TABLE water.readings;--"]
    return {node: flow_of(i) for i, node in enumerate(ids)}


def assert_tables_intact(conn: psycopg.Connection) -> None:
    for table in TABLES:
        assert conn.execute("SELECT to_regclass(%s)", (f"water.{table}",)).fetchone() == (
            f"water.{table}",), table
    (stored,) = conn.execute("SELECT count(*) FROM water.readings").fetchone()
    (accepted,) = conn.execute("SELECT sum(accepted) FROM water.ingest_runs").fetchone()
    assert stored == accepted


def assert_hot_keys(rdb, prefix: str, ids: list[str]) -> None:
    for node in ids:
        assert rdb.hgetall(f"{prefix}node:{node}:latest"), node
        assert rdb.zscore(f"{prefix}nodes:last_seen", node) is not None, node


def test_hostile_ids_and_headers_are_stored_verbatim_or_quarantined(tmp_path, redis_prefix, rdb):
    inputs = write_inputs(tmp_path / "in")
    rdb.set(f"{redis_prefix}sentinel", "still here")
    with fresh_database("waterflow_hostile") as url:
        assert main([
            "replay", str(inputs), "--quiet", "--now", "2026-01-01T00:00:00+00:00",
            "--warm", url, "--hot", REDIS_URL, "--hot-prefix", redis_prefix,
            "--cold", (tmp_path / "cold").as_uri(), "--out", str(tmp_path / "out"),
        ]) == 0
        with psycopg.connect(url) as conn:
            assert_tables_intact(conn)
            for node, flow in expected_flows().items():
                assert conn.execute(
                    "SELECT flow_rate FROM water.readings WHERE node_id = %s", (node,)
                ).fetchall() == [(flow,)], node
            names = dict(conn.execute("SELECT node_id, name FROM water.nodes").fetchall())
            assert set(VERBATIM) <= set(names)
            assert {HEADERS[h]: warm_text(h) for h in HEADERS}.items() <= names.items()
            quarantined = conn.execute(
                "SELECT node_id, reason, raw FROM water.quarantine"
                " WHERE source = 'hostile_ids.csv' ORDER BY line").fetchall()
    assert quarantined == [
        (warm_text(node), "parse_error",
         warm_text(_csv_line(node, flow_of(len(expected_flows()) + i)).rstrip("\n")))
        for i, node in enumerate(UNREADABLE)
    ]
    assert not set(UNREADABLE) & set(names)

    assert_hot_keys(rdb, redis_prefix, [*VERBATIM, *HEADERS.values()])
    for node in UNREADABLE:
        assert not rdb.exists(f"{redis_prefix}node:{node}:latest")
    assert rdb.get(f"{redis_prefix}sentinel") == "still here"

    archived = pl.read_parquet(tmp_path / "cold" / "readings" / "**" / "*.parquet",
                               hive_partitioning=False)
    assert set(VERBATIM) <= set(archived["node_id"])


def test_hostile_kafka_keys_and_ids_are_stored_verbatim(tmp_path, kafka_brokers, redis_prefix,
                                                        rdb):
    topic = f"water.readings.test-{uuid.uuid4().hex[:10]}"
    config = KafkaConfig(brokers=(kafka_brokers,), topic=topic)
    assert ensure_topic(config, topic, 2)

    def message(node: str, key: str, i: int) -> Message:
        value = {"node_id": node, "timestamp": "2024-11-13T05:00:00Z", "flow_rate": flow_of(i)}
        return Message(key=key, event_us=None, value=json.dumps(value).encode())

    messages = [message(node, node, i) for i, node in enumerate(VERBATIM)]
    # the key is not the id: the value says which node it is
    messages.append(message("kafka-plain", "'; DROP TABLE water.nodes; --", len(VERBATIM)))
    unreadable = UNREADABLE + UNREADABLE_JSON
    messages += [message(node, node, 100 + i) for i, node in enumerate(unreadable)]
    assert publish(iter(messages), config).messages == len(messages)
    rdb.set(f"{redis_prefix}sentinel", "still here")

    env = {k: v for k, v in os.environ.items() if not k.startswith("WATERFLOW_")}
    env["WATERFLOW_HOT_PREFIX"] = redis_prefix  # `run` takes it from the environment only
    with fresh_database("waterflow_hostile") as url:
        run = subprocess.run(
            [sys.executable, "-m", "dataflows.cli", "run", "--until-end", "--brokers",
             kafka_brokers, "--topic", topic, "--warm", url, "--hot", REDIS_URL,
             "--cold", str(tmp_path / "cold"),
             "--out", str(tmp_path / "out")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        with psycopg.connect(url) as conn:
            assert_tables_intact(conn)
            stored = dict(conn.execute("SELECT node_id, flow_rate FROM water.readings"))
            reasons = conn.execute("SELECT node_id, reason FROM water.quarantine"
                                   " ORDER BY node_id").fetchall()
    assert stored == {**{n: flow_of(i) for i, n in enumerate(VERBATIM)},
                      "kafka-plain": flow_of(len(VERBATIM))}
    assert reasons == sorted((warm_text(n), "parse_error") for n in unreadable)
    assert_hot_keys(rdb, redis_prefix, [*VERBATIM, "kafka-plain"])
    assert rdb.get(f"{redis_prefix}sentinel") == "still here"


# -- the source: SQL is never text formatted with values ------------------------------------------

#: Calls that run SQL given as their first argument (psycopg connections and cursors).
SQL_CALLS = {"execute", "executemany", "copy"}
#: The one statement that is neither: the numbered migration files shipped in the package.
ALLOWED = {("connectors/warm_postgres.py", "text.encode('utf-8')")}


class SqlCheck:
    """Whether an expression given to ``execute`` is constant text or a psycopg.sql composition.

    Names are followed to their assignments (in the function, then the module); a call is safe
    when it builds ``psycopg.sql`` objects or is a function of the module annotated to return
    one. Anything else (f-strings, ``%``, ``str.format``, text from a parameter) is not.
    """

    def __init__(self, tree: ast.Module) -> None:
        self.module = tree
        self.sql_functions = {
            f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.returns is not None
            and ast.unparse(f.returns).startswith("sql.")
        }

    def safe(self, node: ast.expr, scope: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str | bytes)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.safe(node.left, scope, seen) and self.safe(node.right, scope, seen)
        if isinstance(node, ast.Name):
            if node.id in seen:
                return False
            values = self.assigned(node.id, scope)
            if values is not None and not values:
                values = self.assigned(node.id, self.module, top_level=True)
            return bool(values) and all(self.safe(v, scope, seen | {node.id}) for v in values)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                return func.id in self.sql_functions
            if isinstance(func, ast.Attribute):
                if isinstance(func.value, ast.Name) and func.value.id == "sql":
                    # sql.SQL("...") must wrap constant text; Identifier/Literal quote values
                    return func.attr != "SQL" or all(self.safe(a, scope, seen) for a in node.args)
                if func.attr in ("format", "join") and not isinstance(func.value, ast.Constant):
                    return self.safe(func.value, scope, seen)  # a sql object's, not str's
        return False  # f-strings, %, str.format, parameters, anything unknown

    @staticmethod
    def assigned(name: str, scope: ast.AST, top_level: bool = False) -> list[ast.expr] | None:
        """The values ``name`` is assigned in ``scope``; None when its text cannot be known."""
        nodes = scope.body if top_level and isinstance(scope, ast.Module) else ast.walk(scope)
        values: list[ast.expr] = []
        for node in nodes:
            if isinstance(node, ast.Assign):
                if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    values.append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.target.id == name and node.value is not None:
                    values.append(node.value)
            elif isinstance(node, ast.AugAssign | ast.For | ast.comprehension | ast.withitem):
                target = node.optional_vars if isinstance(node, ast.withitem) else node.target
                if target is not None and any(
                    isinstance(n, ast.Name) and n.id == name for n in ast.walk(target)
                ):
                    return None  # built up, or a loop's / context's value
            elif isinstance(node, ast.arg) and node.arg == name:
                return None  # a parameter
        return values


def unsafe_sql_calls(root: Path, relative: str) -> tuple[list[str], int]:
    """``path:line: expression`` of every SQL call not proven safe, and how many were checked."""
    found, checked = [], 0
    for path in sorted((root / relative).rglob("*.py")):
        name = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        check = SqlCheck(tree)
        scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_CALLS and node.args):
                continue
            checked += 1
            scope = min((f for f in scopes if f.lineno <= node.lineno <= (f.end_lineno or 0)),
                        key=lambda f: (f.end_lineno or 0) - f.lineno, default=tree)
            text = ast.unparse(node.args[0])
            if (name, text) in ALLOWED or check.safe(node.args[0], scope):
                continue
            found.append(f"{name}:{node.lineno}: {text[:100]}")
    return found, checked


def test_every_sql_call_in_the_connectors_is_constant_or_composed():
    found, checked = unsafe_sql_calls(ROOT, "connectors")
    assert found == []
    assert checked >= 20  # the walk did reach the warm tier's statements
    allowed = {(p, t) for p, t in ALLOWED
               if t in {ast.unparse(c.args[0]) for c in ast.walk(ast.parse((ROOT / p).read_text()))
                        if isinstance(c, ast.Call) and c.args}}
    assert allowed == ALLOWED, "an allowed exception is gone: drop it from ALLOWED"


def test_the_sql_check_catches_formatted_text(tmp_path):
    """The check above can fail: each of these is reported, the composed ones are not."""
    source = tmp_path / "connectors" / "bad.py"
    source.parent.mkdir()
    source.write_text(
        "from psycopg import sql\n"
        "PREFIX = 'SELECT * FROM water.readings'\n"
        "def f(conn, node, table):\n"
        "    conn.execute(f\"SELECT * FROM t WHERE node_id = '{node}'\")\n"
        "    conn.execute(\"SELECT * FROM t WHERE node_id = '%s'\" % node)\n"
        "    conn.execute(\"SELECT * FROM {} \".format(table))\n"
        "    conn.execute(PREFIX + \" WHERE node_id = '\" + node + \"'\")\n"
        "    query = 'DELETE FROM ' + table\n"
        "    conn.cursor().execute(query)\n"
        "    conn.execute(sql.SQL(f'SELECT {node}'))\n"
        "    conn.execute(PREFIX + ' WHERE node_id = %s', (node,))\n"
        "    conn.execute(sql.SQL('SELECT * FROM {}').format(sql.Identifier(table)))\n"
        "    composed = sql.SQL('DROP TABLE {}').format(sql.Identifier(table))\n"
        "    conn.execute(composed)\n"
    )
    found, checked = unsafe_sql_calls(tmp_path, "connectors")
    assert [f.split(":")[1] for f in found] == ["4", "5", "6", "7", "9", "10"]
    assert checked == 9
