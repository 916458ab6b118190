"""Run one contender as its own process and read its wall time, CPU time and peak RSS.

``os.wait4`` returns the rusage of exactly that child (user + system CPU of it and of the
children it waited for, and its peak resident set), so contenders run one after another never
mix their figures. Processes the child leaves running (servers it spawned) are not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field


@dataclass
class Run:
    """One measured run of a contender."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    report: dict = field(default_factory=dict)  # the JSON line the child printed, if any


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion; raise with its stderr if it fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{tail}")
        lines = [line for line in out.read().decode().splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, report)
