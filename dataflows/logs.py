"""Logs on stderr: one JSON object per line for a log collector, or plain text for a terminal.

:func:`setup_logging` configures the standard :mod:`logging` module once per process (every
``waterflow`` command and ``dataflows.live.build_from_env`` call it first). The modules keep
logging through ``logging.getLogger(__name__)``; this only decides where and how records go.

- Format (``--log-format`` or ``WATERFLOW_LOG_FORMAT``): ``json``, one object per line with
  ``ts`` (ISO-8601 UTC), ``level``, ``logger``, ``message``, the run's ``run_id``, a record's
  ``node_id`` and ``step`` and any other field given with ``extra={...}``, and ``exception``
  (the whole traceback, in the same object); ``text``, one readable line; ``auto`` (default),
  text when stderr is a terminal, JSON otherwise (a container, a service manager).
- Level (``--log-level`` or ``WATERFLOW_LOG_LEVEL``): DEBUG, INFO (default), WARNING, ERROR.
- The run's id is set once per run (:func:`set_run_id`) and lands on every record of the
  process, those of Bytewax's worker threads included.
- No password reaches a log: every line goes through :func:`redact_text` (the password of any
  URL in it) and hides the secret values configured in the environment.

A wrong level or format is a :class:`~dataflows.config_check.ConfigError` (exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TextIO

from dataflows.config_check import ConfigError, Setting, pick, secrets_in_env
from dataflows.settings import hide_secrets

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "json", "text")
#: Record fields that carry context, in the order they are shown.
CONTEXT = ("run_id", "node_id", "step")
#: Attributes every LogRecord has: anything else on a record came with ``extra={...}``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}
_URL_PASSWORD = re.compile(r"(//[^/@\s:]*:)[^/@\s]+@")

_run_id: str | None = None


def set_run_id(run_id: str | None) -> None:
    """Every record logged from now on in this process carries ``run_id`` (None: no run).

    A process-wide value rather than a context variable: Bytewax runs the flow in threads it
    starts itself, which would not see a context variable set here.
    """
    global _run_id
    _run_id = run_id


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ***.

    >>> redact_text("retry postgresql://writer:s3cret@db/water and redis://:p@cache:6379/0")
    'retry postgresql://writer:***@db/water and redis://:***@cache:6379/0'
    """
    return _URL_PASSWORD.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, newlines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object; ``ts`` in UTC with milliseconds."""
        ts = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_context(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-01-31 12:00:00.123Z WARNING logger [run_id=... node_id=...] message``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one readable line, then its traceback if any."""
        ts = datetime.fromtimestamp(record.created, UTC)
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        text = (f"{ts:%Y-%m-%d %H:%M:%S}.{ts.microsecond // 1000:03d}Z {record.levelname} "
                f"{record.name}{f' [{context}]' if context else ''} {record.getMessage()}")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def _context(record: logging.LogRecord) -> dict[str, object]:
    """run_id, node_id, step, then any other ``extra`` field of the record, when set."""
    fields = vars(record)
    found = {k: fields[k] for k in CONTEXT if fields.get(k) is not None}
    found.update((k, v) for k, v in fields.items()
                 if k not in _STANDARD and k not in found and not k.startswith("_"))
    return found


class _Context(logging.Filter):
    """Adds the run's id to records that do not carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) is None and _run_id is not None:
            record.run_id = _run_id
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (pytest swaps it per test).

    Secrets are hidden from the formatted line, whatever the format.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = {s for s in secrets if s}

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler.__init__ sets it; the property always follows sys.stderr

    def format(self, record: logging.LogRecord) -> str:
        return hide_secrets(redact_text(super().format(record)), self._secrets)


def log_level(setting: Setting) -> int:
    """The logging level of a setting (INFO when not set).

    >>> log_level(Setting("--log-level", "debug")) == logging.DEBUG
    True
    >>> log_level(Setting("WATERFLOW_LOG_LEVEL", "loud"))
    Traceback (most recent call last):
    ...
    dataflows.config_check.ConfigError: WATERFLOW_LOG_LEVEL: expected one of DEBUG, INFO, \
WARNING, ERROR, got 'loud'
    """
    name = (setting.value or "INFO").strip().upper()
    if name not in LEVELS:
        raise ConfigError(setting.name, f"expected one of {', '.join(LEVELS)}, "
                          f"got {setting.value!r}")
    return int(getattr(logging, name))


def log_format(setting: Setting, stream: TextIO | None = None) -> str:
    """``json`` or ``text``: ``auto`` (the default) is text on a terminal, JSON otherwise."""
    name = (setting.value or "auto").strip().lower()
    if name not in FORMATS:
        raise ConfigError(setting.name, f"expected one of {', '.join(FORMATS)}, "
                          f"got {setting.value!r}")
    if name == "auto":
        stream = sys.stderr if stream is None else stream
        return "text" if stream.isatty() else "json"
    return name


def setup_logging(
    level: str | None = None,
    fmt: str | None = None,
    environ: Mapping[str, str] | None = None,
    secrets: Iterable[str | None] = (),
) -> str:
    """Send the records of every logger to stderr in ``fmt`` from ``level`` up; the format used.

    ``level`` and ``fmt`` are the command-line options (None: ``WATERFLOW_LOG_LEVEL`` and
    ``WATERFLOW_LOG_FORMAT``, then INFO and auto). ``secrets`` (passwords given on the command
    line) are hidden from every line, like those of the environment. Calling it again replaces
    what an earlier call set up (the run id too); handlers installed by others (pytest's) are
    left alone.
    """
    set_run_id(None)  # a new command: its run, if any, sets its own
    env = os.environ if environ is None else environ
    number = log_level(pick("--log-level", level, "WATERFLOW_LOG_LEVEL", env))
    chosen = log_format(pick("--log-format", fmt, "WATERFLOW_LOG_FORMAT", env))
    handler = _StderrHandler(secrets_in_env(env) | {s for s in secrets if s})
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(_Context())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    return chosen
