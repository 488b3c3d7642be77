"""Patterns close before their node: each registers its ``close`` with ``Node.on_close``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def close_with(node: Any, close: Callable[[], None]) -> Callable[[], None]:
    """Register ``close`` so ``node.close()`` calls it first; returns the unregister function
    (a no-op for a node-like object without ``on_close``)."""
    register = getattr(node, "on_close", None)
    if register is None:
        return lambda: None
    unregister: Callable[[], None] = register(close)
    return unregister
