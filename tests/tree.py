"""Walking parsed YAML/JSON documents in tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def strings(node: Any) -> Iterator[str]:
    """Every string value of a nested document of dicts and lists, depth first."""
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node
