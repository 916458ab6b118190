"""Fixtures shared by unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dataflows import config_check as check


@pytest.fixture
def clean_env() -> Iterator[None]:
    """No WATERFLOW_* variable of the caller; the environment restored (a file writes to it).

    Opt in with ``pytestmark = pytest.mark.usefixtures("clean_env")``.
    """
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("WATERFLOW_")]:
        del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)
    check.note_file_settings({})
