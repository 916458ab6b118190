"""Peak memory of reading a file with one huge rejected line (issue: a 50 MB line took 780 MB).

Writes a canonical CSV whose middle line is ``--mb`` MB long, then reads it with
``connectors.formats.read_path`` in a child process per format, next to the same file without
that line, and prints wall time and peak RSS of each (``bench/measure.py``):

    .venv/bin/python bench/long_line.py --mb 50
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

CHILD = """
import json, sys
from pathlib import Path
from connectors.formats import read_path
from dataflows.settings import Settings
kept = 0
for chunk in read_path(Path(sys.argv[1]), Settings(), sys.argv[2]):
    kept += sum(len(q.raw) for q in chunk.quarantined)
print(json.dumps({"quarantine_raw_chars": kept}))
"""


def write(path: Path, mb: int) -> None:
    with path.open("wb") as f:
        f.write(b"node_id,timestamp,flow_rate,pressure\n")
        for minute in range(0, 60, 5):
            f.write(f"n1,2024-11-13T06:{minute:02d}:00+01:00,1.0,3.0\n".encode())
            if minute == 30 and mb:
                f.write(b"n1,2024-11-13T06:31:00+01:00," + b"9" * (mb << 20) + b",3.0\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=50, help="size of the long line (default 50)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (0, args.mb):
            path = Path(tmp) / f"line_{mb}mb.csv"
            write(path, mb)
            for fmt in ("canonical", "json"):
                run = measure([sys.executable, "-c", CHILD, str(path), fmt])
                print(json.dumps({"line_mb": mb, "format": fmt, "wall_s": round(run.wall_s, 2),
                                  "peak_rss_mb": round(run.peak_rss_mb), **run.report}))


if __name__ == "__main__":
    main()
