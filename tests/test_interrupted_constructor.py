"""A KeyboardInterrupt (the CLI turns SIGTERM into one) can land anywhere in the main thread,
also in a pattern's constructor after its threads started. ``node.close()`` must then still
stop those threads before it closes the sockets under them: on the old code the work queue's
I/O thread was left polling its ROUTER while the node closed it ("I/O thread crashed ...
Socket operation on non-socket", found by tests/test_cli_sigterm.py under load).

The interrupt is raised from ``node.offer``, which both constructors call after starting their
threads: the same place a signal can land. (The store case passed on the old code too: its
threads stop with its followers; it guards the same ordering, now explicit there.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from patterns.pipeline import WorkQueue
from patterns.pubsub import Store
from tests.util import make_node, unique, wait_until


def _interrupt_offer(node: Any) -> None:
    def offer(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt
    node.offer = offer


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.mark.parametrize("make, prefix", [
    (lambda nd, name: WorkQueue(nd, name), "pipe-q:"),
    (lambda nd, name: Store(nd, topics=(name + ".",)), "mesh-store-"),
], ids=["queue", "store"])
def test_interrupt_in_constructor_then_node_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        make: Callable[[Any, str], object], prefix: str) -> None:
    before = set(_threads(prefix))
    node = make_node(tmp_path / "n", unique("m"))
    try:
        _interrupt_offer(node)
        with pytest.raises(KeyboardInterrupt):
            make(node, unique("q"))
        started = [t for t in _threads(prefix) if t not in before]
        assert started, "the constructor got past starting its threads"
    finally:
        with caplog.at_level(logging.ERROR):
            node.close()
    wait_until(lambda: not any(t.is_alive() for t in started), timeout=10)
    crashed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashed, crashed
