"""One shared helper object per (node, kind): the node's XPUB hub, or its subscriber router.

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
    """The shared object of ``kind`` for ``node``, or None (never creates one)."""
    with _lock:
        return _items.get((id(node), kind))


def offer_handler(node: object) -> Callable[[str, Any], None]:
    """The node's ``pubsub.offer`` handler: hands the offer to the node's subscriber router.

    Registered by publisher hubs and subscriber routers alike (the same behaviour whoever
    registers last), so a node that only publishes does not count other publishers' offers as
    unhandled messages; without subscribers an offer is simply of no use and ignored.
    """

    def handle(peer_id: str, body: Any) -> None:
        router = peek(node, "pubsub.sub")
        if router is not None:
            router.on_offer(peer_id, body)

    return handle
