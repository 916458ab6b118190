"""Warm-tier housekeeping from the live process: retention and partitions ahead, on a timer.

A live run lasts months. ``waterflow db retention`` from cron does the same job, but the live
process already holds the writer's credentials, so it can keep its own database tidy:
``RetentionSchedule`` runs ``apply_retention`` every ``every`` (``WATERFLOW_RETENTION_EVERY_H``,
default 24 h; 0 turns it off) in a daemon thread, the first time one period after the start:
a run started to catch up on old messages writes their months first, and retention at start
would drop a month while the flow is still filling it. A failed turn is logged and the next
turn tries again: the writer creates the partitions it writes into by itself, so a missed turn
only delays dropping old ones. In a cluster only process 0 runs it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from connectors.warm_retention import Action, RetentionPolicy, apply_retention

log = logging.getLogger(__name__)
#: Context of this module's log records (dataflows.logs shows it as fields).
LOG_CONTEXT = {"step": "retention"}

DEFAULT_EVERY = timedelta(hours=24)


def every_from_env(environ: Mapping[str, str] | None = None) -> timedelta | None:
    """``WATERFLOW_RETENTION_EVERY_H`` as a period; None when set to 0 (no schedule)."""
    env = os.environ if environ is None else environ
    text = env.get("WATERFLOW_RETENTION_EVERY_H", "").strip()
    if not text:
        return DEFAULT_EVERY
    try:
        hours = float(text)
    except ValueError:
        raise ValueError(f"WATERFLOW_RETENTION_EVERY_H: expected hours, got {text!r}") from None
    if hours < 0:
        raise ValueError(f"WATERFLOW_RETENTION_EVERY_H: expected hours >= 0, got {text!r}")
    return timedelta(hours=hours) if hours > 0 else None


class RetentionSchedule:
    """``apply_retention`` every ``every`` until ``stop``, in a daemon thread."""

    def __init__(
        self,
        conninfo: str,
        every: timedelta,
        policy: RetentionPolicy | None = None,
        clock: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        self._conninfo = conninfo
        self._every = every
        self._policy = policy or RetentionPolicy()
        self._clock = clock  # the "now" of each turn; None: the wall clock
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="warm-retention", daemon=True)
        self.turns = 0  # turns completed, failed or not
        self.last: list[Action] | None = None  # what the last successful turn did

    def start(self) -> RetentionSchedule:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopped.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stopped.wait(self._every.total_seconds()):
            self._turn()

    def _turn(self) -> None:
        try:
            actions = apply_retention(self._conninfo, self._policy, now=self._clock())
        except Exception as exc:  # logged, retried next turn: housekeeping never stops a run
            log.warning("warm retention failed (next try in %s): %s", self._every, exc,
                        extra=LOG_CONTEXT)
        else:
            self.last = actions
            for action in actions:
                log.info("warm retention: %s", action.describe(dry_run=False), extra=LOG_CONTEXT)
        finally:
            self.turns += 1
