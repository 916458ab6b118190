"""Readers of the input formats (connectors.formats), on the example files and hostile input."""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from connectors.formats import detect_format, parse_json_message, read_path, slug
from dataflows.model import COL, ParsedChunk
from dataflows.settings import Settings

DATA = Path(__file__).resolve().parents[1] / "data"
SELARGIUS = DATA / "REPORT_NODI_SELARGIUS_AGGREGATI_30_MIN_20241113060000_20241120060000.csv"
HIDROCONTA = DATA / "20230611000000-20230618000000-analog-Teatinos-PCR-4-AI00 Entrada.csv"
CANONICAL = DATA / "canonical_example.csv"
BWDF = Path("/work/shared/data/bwdf/bwdf_dma_inflows_Lps_hourly_open.csv")


def us(text: str) -> int:
    """µs UTC of an ISO-8601 instant with offset."""
    dt = datetime.fromisoformat(text)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1e6, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read(path: Path, chunk_rows: int = 100_000, fmt: str = "auto", tz: str = "Europe/Rome"):
    return list(read_path(path, Settings(chunk_rows=chunk_rows, tz=tz), fmt))


def by_node(chunks: list[ParsedChunk]) -> dict[str, dict[str, np.ndarray]]:
    """All accepted readings per node, concatenated over chunks."""
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for c in chunks:
        for b in c.batches:
            d = out.setdefault(b.node_id, {"ts": [], "values": [], "line": []})
            d["ts"].append(b.ts)
            d["values"].append(b.values)
            d["line"].append(b.line)
    return {k: {f: np.concatenate(v) for f, v in d.items()} for k, d in out.items()}


def quarantined(chunks: list[ParsedChunk]):
    return [q for c in chunks for q in c.quarantined]


def reasons(chunks: list[ParsedChunk]) -> Counter:
    return Counter((q.reason, q.whole_reading) for q in quarantined(chunks))


def readings_in(chunks: list[ParsedChunk]) -> int:
    return sum(c.readings_in for c in chunks)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


# ------------------------------------------------------------------------------ slug


def test_slug_examples():
    assert slug("SELARGIUS (NODO VIA SANT ANNA)") == "selargius-nodo-via-sant-anna"
    assert slug("Teatinos-PCR-4-Entrada") == "teatinos-pcr-4-entrada"
    assert slug("  Cañada  Niño--Ø ") == "canada-nino"
    assert slug("DMA 1") == "dma-1"


def test_slug_never_empty_and_stable():
    a, b = slug("水道"), slug("電気")
    assert a and b and a != b
    assert a == slug("水道")
    assert slug("") and slug("---")


# ------------------------------------------------------------------------------ detection


def test_detect_format_of_example_files():
    for path, fmt in [
        (SELARGIUS, "wide"),
        (HIDROCONTA, "hidroconta"),
        (CANONICAL, "canonical"),
        (BWDF, "wide"),
    ]:
        assert detect_format(path, path.read_bytes()[:4096]) == fmt, path.name


def test_detect_format_json_and_unknown(tmp_path):
    assert detect_format(Path("x.jsonl"), b'{"node_id": "a"}\n') == "json"
    assert detect_format(Path("x.txt"), b'\xef\xbb\xbf{"node_id": "a"}') == "json"
    with pytest.raises(ValueError, match="mystery.csv"):
        detect_format(Path("mystery.csv"), b"foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="empty.csv"):
        detect_format(Path("empty.csv"), b"")
    bad = write(tmp_path, "mystery.csv", "foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="mystery.csv"):
        read(bad)
    with pytest.raises(ValueError, match="unknown format"):
        read(CANONICAL, fmt="xml")


# ------------------------------------------------------------------------------ wide: Selargius


def test_selargius_report():
    chunks = read(SELARGIUS)
    assert all(c.source == SELARGIUS.name for c in chunks)
    nodes = by_node(chunks)
    assert list(nodes) == [
        "selargius-nodo-via-sant-anna",
        "selargius-nodo-via-seneca",
        "selargius-serbatoio-selargius",
        "quartucciu-serbatoio-cuccuru-linu",
    ]
    info = {n.node_id: n.name for c in chunks for n in c.nodes}
    assert info["selargius-nodo-via-sant-anna"] == "SELARGIUS (NODO VIA SANT ANNA)"
    # 13/11/2024 06:00 CET is 05:00Z; the first data line is physical line 3 (units row).
    sa = nodes["selargius-nodo-via-sant-anna"]
    assert sa["ts"][0] == us("2024-11-13T05:00:00+00:00")
    assert sa["line"][0] == 3
    v = sa["values"][0]
    assert v[COL["flow_rate"]] == pytest.approx(6.64)
    assert v[COL["pressure"]] == pytest.approx(3.67)
    assert v[COL["temperature"]] == pytest.approx(15.50)
    assert v[COL["total_flow"]] == pytest.approx(10444.4)
    assert math.isnan(v[COL["level"]])
    tank = nodes["selargius-serbatoio-selargius"]["values"][0]
    assert tank[COL["flow_rate"]] == pytest.approx(38.80 / 3.6)  # M3/H column
    assert tank[COL["level"]] == pytest.approx(3.20)
    q = nodes["quartucciu-serbatoio-cuccuru-linu"]["values"][0]
    assert q[COL["flow_rate"]] == pytest.approx(13.47)
    # 336 half-hour rows x 4 nodes, nothing rejected.
    assert readings_in(chunks) == 336 * 4
    assert quarantined(chunks) == []
    assert nodes["selargius-nodo-via-sant-anna"]["ts"][-1] == us("2024-11-20T04:30:00+00:00")
    assert np.all(np.diff(sa["ts"]) == 1800 * 1_000_000)


# ------------------------------------------------------------------------------ wide: BWDF DST


def test_bwdf_autumn_repeated_hour_becomes_two_instants():
    nodes = by_node(read(BWDF))
    assert len(nodes) == 10 and "dma-1" in nodes and "dma-10" in nodes
    d = nodes["dma-1"]
    at = {int(line): int(t) for line, t in zip(d["line"], d["ts"], strict=True)}
    # Lines 7275 and 7276 both say '31/10/2021 02:00'.
    assert iso(at[7275]) == "2021-10-31T00:00:00Z"
    assert iso(at[7276]) == "2021-10-31T01:00:00Z"
    assert iso(at[7274]) == "2021-10-30T23:00:00Z"
    assert iso(at[7277]) == "2021-10-31T02:00:00Z"
    # Spring: 01:00 CET then 03:00 CEST are consecutive hours.
    assert iso(at[2067]) == "2021-03-28T00:00:00Z"
    assert iso(at[2068]) == "2021-03-28T01:00:00Z"
    for node in nodes.values():
        assert np.all(np.diff(node["ts"]) > 0)
        assert np.all(np.diff(node["ts"]) % 3_600_000_000 == 0)


def test_bwdf_ambiguity_across_chunk_boundary():
    # Header is line 1, so chunks of 3637 lines end at line 7275: the two '02:00' rows
    # fall in different chunks.
    whole = by_node(read(BWDF))
    split = read(BWDF, chunk_rows=3637)
    last = [max(int(b.line.max()) for b in c.batches) for c in split[:2]]
    assert last == [3638, 7275]
    parts = by_node(split)
    for node, d in whole.items():
        np.testing.assert_array_equal(d["ts"], parts[node]["ts"])
        np.testing.assert_array_equal(d["values"], parts[node]["values"])
    assert readings_in(split) == readings_in(read(BWDF))


# ------------------------------------------------------------------------------ Hidroconta


def test_hidroconta_export():
    chunks = read(HIDROCONTA)
    nodes = by_node(chunks)
    assert list(nodes) == ["teatinos-pcr-4-entrada"]
    d = nodes["teatinos-pcr-4-entrada"]
    assert len(d["ts"]) == 1008 == readings_in(chunks)  # 7 days of 10-minute data
    assert d["line"][0] == 3
    assert d["ts"][0] == us("2023-06-11T00:00:00+02:00")
    assert d["values"][0, COL["pressure"]] == pytest.approx(3.41)  # decimal comma
    assert np.isnan(d["values"][:, COL["level"]]).all()
    assert chunks[0].nodes[0].name == "Teatinos PCR-4 AI00 Entrada"
    assert quarantined(chunks) == []


HIDRO_BODY = (
    '"X"\nData/Ora;Valore;Unità\n2023/06/11 00:00:00;{v};{u}\n2023/06/11 00:10:00;1.234,5;{u}\n'
)


def test_hidroconta_kinds(tmp_path):
    name = "20230611000000-20230618000000-{}-Teatinos-PCR-4-{} Salida.csv"
    body = HIDRO_BODY.format(v="36", u="m3/h")
    flow = write(tmp_path, name.format("consumption-flow", "C01"), body)
    nodes = by_node(read(flow))
    assert list(nodes) == ["teatinos-pcr-4-salida"]
    assert nodes["teatinos-pcr-4-salida"]["values"][:, COL["flow_rate"]] == pytest.approx(
        [10.0, 1234.5 / 3.6]
    )
    vol = write(tmp_path, name.format("consumption", "C00"), HIDRO_BODY.format(v="7,5", u="m3"))
    assert by_node(read(vol))["teatinos-pcr-4-salida"]["values"][:, COL["total_flow"]] == (
        pytest.approx([7.5, 1234.5])
    )
    lvl = write(tmp_path, name.format("analog", "AI01"), HIDRO_BODY.format(v="2,5", u="m"))
    assert by_node(read(lvl))["teatinos-pcr-4-salida"]["values"][0, COL["level"]] == 2.5
    for kind in ("solar", "consumption-hours"):
        p = write(tmp_path, name.format(kind, "X9"), HIDRO_BODY.format(v="12,5", u="V"))
        chunks = read(p)
        assert by_node(chunks) == {}
        qs = quarantined(chunks)
        assert [(q.reason, q.whole_reading, q.line) for q in qs] == [
            ("unsupported_channel", True, 3),
            ("unsupported_channel", True, 4),
        ]
        assert qs[0].raw == "2023/06/11 00:00:00;12,5;V"
        assert readings_in(chunks) == 2


def test_hidroconta_hostile_lines(tmp_path):
    p = write(
        tmp_path,
        "20230611000000-20230618000000-analog-Site-D-1-AI00 In.csv",
        '"Site D-1 AI00 In"\r\nData/Ora;Valore;Unità\r\n'
        "2023/06/11 00:00:00;3,52;bar\r\n"
        "2023/06/11 00:10:00;abc;bar\r\n"
        "2023/06/11 00:20:00;3,5;psi\r\n"
        "2023/13/11 00:30:00;3,5;bar\r\n"
        "garbage\r\n"
        "2023/03/26 02:30:00;3,5;bar\r\n\r\n",
    )
    chunks = read(p)
    assert by_node(chunks)["site-d-1-in"]["line"].tolist() == [3]
    assert [(q.line, q.reason, q.whole_reading) for q in quarantined(chunks)] == [
        (4, "parse_error", True),
        (5, "unit_unknown", True),
        (6, "bad_timestamp", True),
        (7, "parse_error", True),
        (8, "bad_timestamp", True),  # 02:30 does not exist on the spring-forward night
    ]
    assert readings_in(chunks) == 6


# ------------------------------------------------------------------------------ canonical


def test_canonical_example():
    chunks = read(CANONICAL)
    nodes = by_node(chunks)
    assert list(nodes) == ["SEL-001"]
    d = nodes["SEL-001"]
    assert len(d["ts"]) == 24 == readings_in(chunks)
    assert d["ts"][0] == us("2024-11-12T23:00:00+00:00")
    assert d["values"][0, :4] == pytest.approx([10.0, 3.9, 16.2, 10432.5])
    assert np.isnan(d["values"][:, 4:]).all()
    assert [n.node_id for c in chunks for n in c.nodes] == ["SEL-001"]


def test_canonical_timestamps(tmp_path):
    p = write(
        tmp_path,
        "t.csv",
        "node_id,timestamp,flow_rate,extra\n"
        "a,2024-11-13T06:00:00+01:00,1,x\n"
        "a,2024-11-13T05:00:00Z,2,x\n"
        "a,2024-11-13 06:00:00.250-03:30,3,x\n"
        "a,2024-11-13T06:00:00,4,x\n"  # local (Europe/Rome, CET)
        "a,2024-07-01T06:00,5,x\n"  # local, CEST
        "a,2099-01-01T00:00:00Z,6,x\n"
        "a,2024-10-27T02:30:00,7,x\n"  # ambiguous: first = CEST
        "b,2024-10-27T02:30:00,8,x\n"  # another node: its own first occurrence
        "a,2024-10-27T02:30:00,9,x\n"  # second for a = CET
        "a,2024-03-31T02:30:00,10,x\n"  # does not exist
        "a,2024-02-30T00:00:00Z,11,x\n"
        "a,13/11/2024 06:00,12,x\n",
    )
    chunks = read(p)
    a = by_node(chunks)["a"]
    got = dict(zip(a["values"][:, 0].tolist(), a["ts"].tolist(), strict=True))
    assert got[1.0] == got[2.0] == us("2024-11-13T05:00:00+00:00")
    assert got[3.0] == us("2024-11-13T09:30:00.250+00:00")
    assert got[4.0] == us("2024-11-13T05:00:00+00:00")
    assert got[5.0] == us("2024-07-01T04:00:00+00:00")
    assert got[6.0] == us("2099-01-01T00:00:00+00:00")
    assert got[7.0] == us("2024-10-27T00:30:00+00:00")
    assert got[9.0] == us("2024-10-27T01:30:00+00:00")
    assert got[12.0] == us("2024-11-13T05:00:00+00:00")
    assert by_node(chunks)["b"]["ts"].tolist() == [us("2024-10-27T00:30:00+00:00")]
    assert [(q.line, q.reason) for q in quarantined(chunks)] == [
        (11, "bad_timestamp"),
        (12, "bad_timestamp"),
    ]
    assert readings_in(chunks) == 12


HOSTILE = (
    b"\xef\xbb\xbfnode_id,timestamp,flow_rate,pressure\r\n"  # 1
    b"SEL-001,2024-11-13T06:00:00+01:00,12.4,3.9\r\n"  # 2 ok
    b"this is not a csv line at all\r\n"  # 3 parse_error
    b"SEL-001,2024-11-13T06:10:00+01:00,12.5\r\n"  # 4 ok (trailing empty cell left off)
    b"SEL-001,not-a-time,12.5,3.9\r\n"  # 5 bad_timestamp
    b"SEL-001,2099-01-01T00:00:00Z,12.5,3.9\r\n"  # 6 ok (the validator judges the future)
    b"SEL-001,2024-11-13T06:15:00+01:00,NaN,3.9\r\n"  # 7 ok + non_finite value
    b"SEL-001,2024-11-13T06:20:00+01:00,inf,-inf\r\n"  # 8 non_finite whole
    b"SEL-001,2024-11-13T06:25:00+01:00,abc,3.8\r\n"  # 9 ok + parse_error value
    b'"x\'; DROP TABLE water.readings;--",2024-11-13T06:00:00+01:00,1.0,3.0\r\n'  # 10 ok
    b"nodo-\xc3\xa0\xc3\xa8-\xe6\xb0\xb4,2024-11-13T06:00:00+01:00,2.0,3.1\r\n"  # 11 ok
    b",2024-11-13T06:00:00+01:00,2.0,3.1\r\n"  # 12 missing_field
    b"SEL-002,,2.0,3.1\r\n"  # 13 missing_field
    b"SEL\x01X,2024-11-13T06:00:00+01:00,2.0,3.1\r\n"  # 14 parse_error (control char)
    b"\r\n"  # 15 blank
    b"bad\xff\xfebytes,2024-11-13T06:00:00+01:00,2.0,\r\n"  # 16 ok (replacement chars)
    b'"quoted, id",2024-11-13T06:00:00+01:00,,\r\n'  # 17 ok, nothing measured
    b'"unclosed,2024-11-13T06:00:00+01:00,1,2\r\n'  # 18 parse_error
    b"SEL-001,2024-11-13T06:30:00+01:00,1e999,\r\n"  # 19 non_finite whole
    + (b"L" * 201)
    + b",2024-11-13T06:00:00+01:00,2.0,3.1\r\n"  # 20 parse_error (too long)
    b"\r\n\r\n"
)


def test_canonical_hostile_lines(tmp_path):
    chunks = read(write(tmp_path, "hostile.csv", HOSTILE))
    got = [(q.line, q.reason, q.whole_reading, q.measurement) for q in quarantined(chunks)]
    assert got == [
        (3, "parse_error", True, None),
        (5, "bad_timestamp", True, None),
        (7, "non_finite", False, "flow_rate"),
        (8, "non_finite", True, "flow_rate"),
        (9, "parse_error", False, "flow_rate"),
        (12, "missing_field", True, None),
        (13, "missing_field", True, None),
        (14, "parse_error", True, None),
        (18, "parse_error", True, None),
        (19, "non_finite", True, "flow_rate"),
        (20, "parse_error", True, None),
    ]
    qs = {q.line: q for q in quarantined(chunks)}
    assert qs[3].raw == "this is not a csv line at all"  # no CR, no BOM
    assert qs[9].raw == "flow_rate=abc"
    assert qs[9].node_id == "SEL-001" and qs[9].ts == us("2024-11-13T06:25:00+01:00")
    nodes = by_node(chunks)
    assert set(nodes) == {
        "SEL-001",
        "x'; DROP TABLE water.readings;--",
        "nodo-àè-水",
        "bad\ufffd\ufffdbytes",
        "quoted, id",
    }
    sel = nodes["SEL-001"]
    assert sel["line"].tolist() == [2, 4, 6, 7, 9]
    assert sel["values"][1, COL["flow_rate"]] == 12.5 and np.isnan(sel["values"][1, 1])
    assert np.isnan(sel["values"][3, COL["flow_rate"]])
    assert sel["values"][3, COL["pressure"]] == 3.9
    assert np.isnan(sel["values"][4, COL["flow_rate"]]) and sel["values"][4, 1] == 3.8
    assert np.isnan(nodes["quoted, id"]["values"]).all()
    accepted = sum(len(d["ts"]) for d in nodes.values())
    whole = sum(1 for q in quarantined(chunks) if q.whole_reading)
    assert accepted == 9 and whole == 9
    # Lines 2..20 minus the blank line 15: 18 data lines, each exactly one reading.
    assert readings_in(chunks) == 18


def test_chunking_gives_same_result(tmp_path):
    hostile = write(tmp_path, "hostile.csv", HOSTILE)
    small = (1, 2, 7)
    cases = [(hostile, small), (_wide_hostile(tmp_path), small), (CANONICAL, small)]
    cases += [(SELARGIUS, (5, 97)), (HIDROCONTA, (13, 500))]
    for path, sizes in cases:
        one = read(path)
        for rows in sizes:
            many = read(path, chunk_rows=rows)
            assert readings_in(many) == readings_in(one), (path.name, rows)
            a, b = by_node(one), by_node(many)
            assert list(a) == list(b)
            for node in a:
                for f in ("ts", "values", "line"):
                    np.testing.assert_array_equal(a[node][f], b[node][f])
            key = [(q.line, q.reason, q.raw, q.node_id, q.whole_reading) for q in quarantined(one)]
            assert key == [
                (q.line, q.reason, q.raw, q.node_id, q.whole_reading) for q in quarantined(many)
            ]
            assert [n.node_id for c in many for n in c.nodes] == list(b)


def test_empty_and_header_only(tmp_path):
    for content in (b"", b"\xef\xbb\xbf", b"\r\n\r\n"):
        chunks = read(write(tmp_path, "e.csv", content))
        assert len(chunks) == 1 and readings_in(chunks) == 0 and chunks[0].source == "e.csv"
    for fmt in ("canonical", "wide", "hidroconta", "json"):
        assert readings_in(read(write(tmp_path, "e.csv", b""), fmt=fmt)) == 0
    chunks = read(write(tmp_path, "h.csv", "node_id,timestamp,flow_rate\r\n\r\n"))
    assert len(chunks) == 1 and readings_in(chunks) == 0 and quarantined(chunks) == []
    chunks = read(write(tmp_path, "w.csv", "DATA;ORA;A - PORTATA\n;;L/S\n"))
    assert readings_in(chunks) == 0 and quarantined(chunks) == []


def test_canonical_header_without_node_or_time(tmp_path):
    p = write(tmp_path, "n.csv", "id,when,flow_rate\na,2024-01-01T00:00:00Z,1\n\nb,x,2\n")
    chunks = read(p, fmt="canonical", chunk_rows=1)
    assert [(q.line, q.reason, q.raw) for q in quarantined(chunks)] == [
        (1, "missing_field", "id,when,flow_rate"),
        (2, "missing_field", "a,2024-01-01T00:00:00Z,1"),
        (4, "missing_field", "b,x,2"),
    ]
    assert readings_in(chunks) == 3


def test_chunk_rows_bounds_lines_per_chunk(tmp_path):
    lines = "".join(f"n{i % 3},2024-01-01T00:{i:02d}:00Z,{i}\n" for i in range(50))
    chunks = read(write(tmp_path, "c.csv", "node_id,timestamp,flow_rate\n" + lines), chunk_rows=8)
    assert len(chunks) == 7  # 50 data lines in chunks of 8
    for c in chunks:
        assert c.readings_in <= 8
        for b in c.batches:
            assert np.all(np.diff(b.line) > 0)
    assert [n.node_id for n in chunks[0].nodes] == ["n0", "n1", "n2"]
    assert all(c.nodes == [] for c in chunks[1:])


# ------------------------------------------------------------------------------ wide: hostile


def _wide_hostile(tmp_path: Path) -> Path:
    text = (
        "DATA;ORA;NODO A - PORTATA;NODO A - PRESSIONE;NODO A - PORTATA BYPASS;"
        "NODO B - LIVELLO;NODO C - COSA;NODO D (kPa);NODO E (l/min);NODO F - PRESSIONE\n"
        ";;M3/H;BAR;L/S;M;XYZ;;;MCA\n"
        "01/02/2024;00:00;3,6;1.234,5;1,0;2,0;5;100;60;10\n"  # 3 all fine
        "01/02/2024;00:30;N/D;-;n.d.;NaN;;;;\n"  # 4 nothing present
        "01/02/2024;01:00;abc;2,5;;xyz;7;;;\n"  # 5 bad cells
        "31/02/2024;01:30;1;1;1;1;1;1;1;1\n"  # 6 bad timestamp
        "01/02/2024;02:00;1;1\n"  # 7 trailing empty cells left off
        "01/02/2024;02:30;inf;;;;;;;\n"  # 8 only cell non-finite
        "01/02/2024;03:00;1;1;1;1;1;1;1;1;1\n"  # 9 one cell too many
    )
    return write(tmp_path, "REPORT_HOSTILE.csv", text.encode("latin-1"))


def test_wide_hostile(tmp_path):
    chunks = read(_wide_hostile(tmp_path))
    nodes = by_node(chunks)
    assert set(nodes) == {
        "nodo-a",
        "nodo-a-portata-bypass",
        "nodo-b",
        "nodo-d",
        "nodo-e",
        "nodo-f",
    }
    a = nodes["nodo-a"]
    assert a["line"].tolist() == [3, 5, 7]
    assert a["values"][2, COL["flow_rate"]] == pytest.approx(1 / 3.6)
    assert a["values"][2, COL["pressure"]] == 1.0
    assert a["values"][0, COL["flow_rate"]] == pytest.approx(1.0)  # 3,6 m3/h
    assert a["values"][0, COL["pressure"]] == pytest.approx(1234.5)  # thousands grouping
    assert np.isnan(a["values"][1, COL["flow_rate"]]) and a["values"][1, COL["pressure"]] == 2.5
    assert a["ts"][0] == us("2024-01-31T23:00:00+00:00")
    assert nodes["nodo-a-portata-bypass"]["values"][0, COL["flow_rate"]] == 1.0
    assert nodes["nodo-d"]["values"][0, COL["pressure"]] == pytest.approx(1.0)  # 100 kPa
    assert nodes["nodo-e"]["values"][0, COL["flow_rate"]] == pytest.approx(1.0)  # 60 l/min
    assert nodes["nodo-f"]["values"][0, COL["pressure"]] == pytest.approx(0.980665)  # 10 mca
    got = [(q.line, q.reason, q.whole_reading, q.node_id) for q in quarantined(chunks)]
    assert got == [
        (3, "unit_unknown", True, "nodo-c"),
        (5, "parse_error", False, "nodo-a"),
        (5, "parse_error", True, "nodo-b"),
        (5, "unit_unknown", True, "nodo-c"),
        (6, "bad_timestamp", True, "nodo-a"),
        (6, "bad_timestamp", True, "nodo-a-portata-bypass"),
        (6, "bad_timestamp", True, "nodo-b"),
        (6, "bad_timestamp", True, "nodo-c"),
        (6, "bad_timestamp", True, "nodo-d"),
        (6, "bad_timestamp", True, "nodo-e"),
        (6, "bad_timestamp", True, "nodo-f"),
        (8, "non_finite", True, "nodo-a"),
        (9, "parse_error", True, None),
    ]
    qs = quarantined(chunks)
    assert qs[1].raw == "NODO A - PORTATA=abc" and qs[1].measurement == "flow_rate"
    assert qs[0].raw.startswith("01/02/2024;00:00;")
    # Readings: row 3 has 7 nodes, row 5 has 3 (a, b, c), row 6 has 7, row 7 has 1 (a),
    # row 8 has 1, row 9 is one unreadable line.
    assert readings_in(chunks) == 7 + 3 + 7 + 1 + 1 + 1
    assert sum(len(d["ts"]) for d in nodes.values()) == 6 + 1 + 1


def test_wide_comma_separated_single_time_column(tmp_path):
    p = write(
        tmp_path,
        "w.csv",
        "\ufeffTIMESTAMP,DMA 1 (L/s),DMA 2 (m3/h)\r\n"
        "2024-01-01 00:00,1.5,36\r\n"
        "2024-01-01 01:00,,\r\n"
        "2024-01-01 02:00,2.5,x\r\n\r\n",
    )
    chunks = read(p)
    nodes = by_node(chunks)
    assert nodes["dma-1"]["values"][:, 0].tolist() == [1.5, 2.5]
    assert nodes["dma-2"]["values"][:, 0] == pytest.approx([10.0])
    assert nodes["dma-1"]["ts"][0] == us("2023-12-31T23:00:00+00:00")
    assert [(q.line, q.reason, q.whole_reading, q.raw) for q in quarantined(chunks)] == [
        (4, "parse_error", True, "2024-01-01 02:00,2.5,x")
    ]
    assert readings_in(chunks) == 4


# ------------------------------------------------------------------------------ JSON


def test_json_message_ok_and_unknown_fields():
    settings = Settings()
    chunk = parse_json_message(
        b"SEL-001",
        b'{"node_id":"SEL-001","timestamp":"2024-11-13T06:00:00+01:00","flow_rate":12.4,'
        b'"pressure":"3.9","vendor":{"x":1}}',
        "water.readings/0",
        42,
        settings,
    )
    assert chunk.readings_in == 1 and chunk.quarantined == []
    b = chunk.batches[0]
    assert b.node_id == "SEL-001" and b.source == "water.readings/0"
    assert b.ts.tolist() == [us("2024-11-13T05:00:00+00:00")] and b.line.tolist() == [42]
    assert b.values[0, :2].tolist() == [12.4, 3.9]
    assert [n.node_id for n in chunk.nodes] == ["SEL-001"]


@pytest.mark.parametrize(
    ("value", "reason", "whole"),
    [
        (b"not json", "parse_error", True),
        (b"[1, 2]", "parse_error", True),
        (b'{"timestamp":"2024-11-13T06:00:00Z","flow_rate":1}', "missing_field", True),
        (b'{"node_id":"a","flow_rate":1}', "missing_field", True),
        (b'{"node_id":"a","timestamp":"yesterday","flow_rate":1}', "bad_timestamp", True),
        (b'{"node_id":"a","timestamp":12345,"flow_rate":1}', "bad_timestamp", True),
        (b'{"node_id":"a","timestamp":"2024-11-13T06:00:00Z","flow_rate":NaN}', "non_finite", True),
        (
            b'{"node_id":"a","timestamp":"2024-11-13T06:00:00Z","flow_rate":"-inf","pressure":3}',
            "non_finite",
            False,
        ),
        (
            b'{"node_id":"a","timestamp":"2024-11-13T06:00:00Z","flow_rate":"x","pressure":3}',
            "parse_error",
            False,
        ),
        (
            b'{"node_id":"a","timestamp":"2024-11-13T06:00:00Z","flow_rate":true}',
            "parse_error",
            True,
        ),
        (b'{"node_id":"a\\u0000","timestamp":"2024-11-13T06:00:00Z"}', "parse_error", True),
        (b"\xff\xfe{", "parse_error", True),
    ],
)
def test_json_message_quarantine(value, reason, whole):
    chunk = parse_json_message(None, value, "k", 7, Settings())
    assert chunk.readings_in == 1
    assert [(q.reason, q.whole_reading, q.line) for q in chunk.quarantined] == [(reason, whole, 7)]
    if whole:
        assert chunk.quarantined[0].raw == value.decode("utf-8", errors="replace")
        assert chunk.batches == []


def test_json_lines_file(tmp_path):
    p = write(
        tmp_path,
        "msgs.jsonl",
        '{"node_id":"a","timestamp":"2024-11-13T06:00:00Z","level":2}\n\n'
        "oops\n"
        '{"node_id":"b","timestamp":"2024-11-13T06:00:00+01:00","chlorine":0.2}\n',
    )
    chunks = read(p, chunk_rows=2)
    nodes = by_node(chunks)
    assert nodes["a"]["values"][0, COL["level"]] == 2.0
    assert nodes["b"]["line"].tolist() == [4]
    assert [(q.line, q.reason) for q in quarantined(chunks)] == [(3, "parse_error")]
    assert readings_in(chunks) == 3


# ------------------------------------------------------------------------------ speed


def test_parse_speed_smoke(tmp_path):
    # A small guard against per-cell Python loops (the full benchmark is in the report).
    n = 200_000
    body = "".join(f"N{i % 50},2024-01-01T00:00:00+01:00,{i}.5,3.1,15,{i}\n" for i in range(n))
    header = "node_id,timestamp,flow_rate,pressure,temperature,total_flow\n"
    p = write(tmp_path, "big.csv", header + body)

    start = time.process_time()
    assert readings_in(read(p)) == n
    assert time.process_time() - start < 5.0


def test_wide_latin1_units_and_quoted_cells(tmp_path):
    # A non-UTF-8 export: the degree sign is not valid UTF-8, the unit is still read.
    text = 'DATA;ORA;"N1 - TEMPERATURA";N1 - PRESSIONE\n;;\xb0C;BAR\n01/02/2024;00:00;"12,5";3,1\n'
    chunks = read(write(tmp_path, "l1.csv", text.encode("latin-1")))
    n1 = by_node(chunks)["n1"]
    assert n1["values"][0, COL["temperature"]] == 12.5
    assert n1["values"][0, COL["pressure"]] == pytest.approx(3.1)
    assert readings_in(chunks) == 1 and quarantined(chunks) == []


def test_header_separator_counts_rather_than_tests_presence():
    from connectors.formats._common import header_separator

    assert header_separator("node_id,timestamp,flow_rate") == ","
    assert header_separator("node_id;timestamp;flow_rate") == ";"
    assert header_separator("DATA;ORA;NODO VIA ROMA, 12 - PRESSIONE;NODO X - PORTATA") == ";"
    assert header_separator("node_id\ttimestamp\tpressure") == "\t"
    assert header_separator("timestamp") == ","


# -- rows that leave off their trailing empty fields (SCADA exports) ---------------------------


def test_canonical_rows_may_leave_off_trailing_empty_fields(tmp_path):
    """Long CSV: a row shorter than the header keeps the values it carries."""
    lines = CANONICAL.read_text().splitlines()
    header, first, second = lines[0], lines[1], lines[2]
    node, ts, flow, *_ = first.split(",")
    text = "\n".join([
        header,
        f"{node},{ts},{flow}",  # temperature, pressure, total_flow left off
        ",".join(second.split(",")[:4]),  # total_flow and temperature left off
        f"{node},{ts}",  # nothing measured: a reading without values, not an error
        f"{node},{second.split(',')[1]},1,2,3,4,5",  # one cell too many
        node,  # a single cell cannot be split: parse_error as before
    ]) + "\n"
    chunks = read(write(tmp_path, "short.csv", text))
    got = by_node(chunks)[node]
    assert got["line"].tolist() == [2, 3, 4]
    assert got["values"][0, COL["flow_rate"]] == float(flow)
    assert np.isnan(got["values"][0, [COL["pressure"], COL["total_flow"]]]).all()
    assert got["values"][1, COL["pressure"]] == float(second.split(",")[3])
    assert np.isnan(got["values"][2]).all()
    assert [(q.line, q.reason) for q in quarantined(chunks)] == [(5, "parse_error"),
                                                                 (6, "parse_error")]
    assert readings_in(chunks) == 5


def test_wide_rows_may_leave_off_trailing_empty_fields(tmp_path):
    """The Selargius report with its last columns left off on some rows, as SCADA writes."""
    text = SELARGIUS.read_text(encoding="utf-8-sig").splitlines()
    short = text[:2] + [";".join(row.split(";")[:4]) for row in text[2:6]] + text[6:8]
    path = write(tmp_path, SELARGIUS.name, "\n".join(short) + "\n")
    full = by_node(read(SELARGIUS))
    cut = read(path)
    assert not any(q.reason == "parse_error" for q in quarantined(cut))
    nodes = by_node(cut)
    anna = nodes["selargius-nodo-via-sant-anna"]
    assert anna["line"].tolist() == [3, 4, 5, 6, 7, 8]
    # the cells a short row carries are read as in the whole file; the rest is "not measured"
    same = full["selargius-nodo-via-sant-anna"]["values"][:6]
    np.testing.assert_array_equal(anna["values"][:, COL["flow_rate"]],
                                  same[:, COL["flow_rate"]])
    np.testing.assert_array_equal(anna["values"][:4, COL["pressure"]],
                                  same[:4, COL["pressure"]])
    assert np.isnan(anna["values"][:4, COL["temperature"]]).all()
    assert not np.isnan(anna["values"][4:, COL["temperature"]]).any()
    assert nodes["selargius-nodo-via-seneca"]["line"].tolist() == [7, 8]


def test_quoted_short_rows_are_padded_too(tmp_path):
    text = 'node_id,timestamp,flow_rate,pressure\n"a, b",2024-11-13T06:00:00+01:00,1.5\n'
    got = by_node(read(write(tmp_path, "q.csv", text)))["a, b"]
    assert got["values"][0, COL["flow_rate"]] == 1.5 and np.isnan(got["values"][0, 1])


def test_a_quoted_field_spanning_lines_is_quarantined_not_read_as_a_node(tmp_path):
    text = ('node_id,timestamp,flow_rate,pressure\n'
            'n1,2024-11-13T06:00:00+01:00,1.0,3.0\n'
            '"n2 ""north",2024-11-13T06:00:00+01:00,1.5,3.1\n'  # a doubled quote: one record
            '"n3 pump\n'  # a quoted node name broken by a line end...
            'station",2024-11-13T06:00:00+01:00,2.0,3.2\n'  # ...would make a node 'station"'
            'n4,2024-11-13T06:05:00+01:00,2.5,3.3\n')
    chunks = read(write(tmp_path, "broken.csv", text))
    assert sorted(by_node(chunks)) == ["n1", 'n2 "north', "n4"]
    assert [(q.line, q.reason, q.whole_reading) for q in quarantined(chunks)] == [
        (4, "parse_error", True), (5, "parse_error", True)]
    assert readings_in(chunks) == 5  # every line is accounted for


# -- what quarantine keeps of a rejected line ---------------------------------------------------


def test_quarantine_keeps_the_first_bytes_and_says_what_was_cut(tmp_path):
    long_id = "N" * 10_000
    text = ("node_id,timestamp,flow_rate,pressure\n"
            f"{long_id},2024-11-13T06:00:00+01:00,1.0,3.0\n"  # 10 KB id: parse_error
            "n1,2024-11-13T06:00:00+01:00," + "x" * 5000 + ",3.0\n")  # 5 KB bad value
    path = write(tmp_path, "long.csv", text)
    whole, value = quarantined(read(path))
    assert whole.reason == "parse_error" and whole.whole_reading
    cut = len(long_id) + len(",2024-11-13T06:00:00+01:00,1.0,3.0") - 4096
    assert whole.raw == "N" * 4096 + f"... [cut: {cut} bytes]"
    assert value.raw == "flow_rate=" + "x" * 4086 + "... [cut: 914 bytes]"
    assert not value.whole_reading
    small = list(read_path(path, Settings(quarantine_raw_bytes=100)))
    assert quarantined(small)[0].raw == "N" * 100 + f"... [cut: {cut + 3996} bytes]"


def test_json_and_kafka_values_are_cut_too(tmp_path):
    message = b'{"node_id": "n1", "timestamp": "' + b"9" * 9000 + b'"}'
    (q,) = parse_json_message(None, message, "water.readings/0", 7,
                              Settings(quarantine_raw_bytes=64)).quarantined
    assert q.reason == "bad_timestamp"
    assert q.raw == message[:64].decode() + f"... [cut: {len(message) - 64} bytes]"


def test_a_line_too_long_to_read_is_skipped_in_bounded_memory(tmp_path):
    """A multi-MB line is one parse_error whose first bytes are kept; the rest is not held."""
    from connectors.formats._common import MAX_LINE_BYTES

    size = 3 * MAX_LINE_BYTES
    path = tmp_path / "huge.csv"
    with path.open("wb") as f:
        f.write(b"node_id,timestamp,flow_rate\n")
        f.write(b"n1,2024-11-13T06:00:00+01:00,1.0\n")
        f.write(b"n1,2024-11-13T06:05:00+01:00," + b"9" * size + b"\n")
        f.write(b"n1,2024-11-13T06:10:00+01:00,2.0")  # no line end at the end of the file
    for fmt in ("canonical", "json"):
        chunks = list(read_path(path, Settings(), fmt))
        qs = [q for q in quarantined(chunks) if q.line == 3]
        assert len(qs) == 1 and qs[0].reason == "parse_error" and qs[0].whole_reading
        assert qs[0].raw.endswith(f"... [cut: {size + 29 - 4096} bytes]")
        assert len(qs[0].raw) < 4200
        assert readings_in(chunks) == 3 + (fmt == "json")  # a JSON reader rejects the header
    assert by_node(read(path))["n1"]["line"].tolist() == [2, 4]


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_line_reader_cuts_long_lines_across_blocks(tmp_path, block):
    from connectors.formats._common import LineReader

    lines = [b"short", b"x" * 250, b"", b"y" * 90 + "é".encode() * 10, b"z" * 101, b"end"]
    path = tmp_path / "lines.txt"
    path.write_bytes(b"\r\n".join(lines))
    reader = LineReader(path, block_bytes=block, max_line_bytes=100)
    try:
        start, got = reader.take(100)
    finally:
        reader.close()
    assert start == 1 and len(got) == len(lines)
    assert got[0] == "short" and got[2] == "" and got[5] == "end"
    assert got[1] == "x" * 100 and got[4] == "z" * 100
    # 110 bytes (90 + 10 two-byte characters) but 100 characters: cut by bytes
    assert reader.too_long == {2: 250, 4: 110, 5: 101}
    assert got[3].startswith("y" * 90)


def test_fast_clock_layouts_read_as_the_regex_path_does():
    """Each exact layout tried first (chrono) gives what the lenient regexes give, or leaves
    the text to them: a layout added for speed must not change a single reading."""
    import polars as pl

    from connectors.formats._common import _parse_clock_regex, parse_clock

    text = pl.Series([
        "2024-11-03T23:00:00Z", "2024-11-03T23:00:00.5Z", "2024-11-03T23:00:00.123456Z",
        "2024-02-29T12:00:00Z", "2023-02-29T12:00:00Z", "2024-11-03T24:00:00Z",
        "2024-11-03T23:00:00z", "2024-11-03T23:00:00+01:00", "2024-11-03T23:00:00.25-03:30",
        "2024-11-03T23:00:00", "03/11/2024 23:00:00", "03/11/2024 23:00", "2024/11/03 23:00:00",
        "12024-11-03T23:00:00Z", "1969-12-31T23:59:59Z", " 2024-11-03T23:00:00Z ",
    ])
    fast = parse_clock(text)
    slow = _parse_clock_regex(text.str.strip_chars())
    for got, want in zip(fast, slow, strict=True):
        assert got.tolist() == want.tolist()
    us, has_offset, ok = fast
    assert ok.tolist() == [True] * 4 + [False, False] + [True] * 7 + [False, True, True]
    assert us[0] == 1_730_674_800_000_000 and has_offset[0]
    assert us[1] - us[0] == 500_000
