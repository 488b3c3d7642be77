"""One shared helper object per (node, kind): the node's pub/sub data hub, or its subscriber router.

Control handlers are registered once per node and kind; several Publisher/Subscriber objects on
one node share them through this registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_items: dict[tuple[int, str], Any] = {}


def get_or_create(node: object, kind: str, factory: Callable[[], T]) -> T:
    """The shared object of ``kind`` for ``node``, made by ``factory`` the first time."""
    key = (id(node), kind)
    with _lock:
        item = _items.get(key)
        if item is None:
            item = factory()
            _items[key] = item
        return item


def drop(node: object, kind: str, item: object) -> None:
    """Forget ``item`` (when its last user closed), unless it was already replaced."""
    key = (id(node), kind)
    with _lock:
        if _items.get(key) is item:
            del _items[key]



def peek(node: object, kind: str) -> Any:
    """The shared object of ``kind`` for ``node`` if one exists now (never creates one)."""
    with _lock:
        return _items.get((id(node), kind))
