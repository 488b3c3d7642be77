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


def test_interrupt_inside_thread_start_then_node_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal lands inside ``Thread.start()`` of the queue's I/O thread: the thread exists
    but has not run a line of the queue's code yet. ``node.close()`` must not close the queue's
    pipe and sockets and then let that thread poll them (the old code decided by the thread's
    ident, which a thread sets itself: "I/O thread crashed ... Bad file descriptor", seen in
    tests/test_cli_sigterm.py). Here the thread is held at its start until the close is done,
    and ``start()`` raises the interrupt once the thread is spawned."""
    gate = threading.Event()
    real = threading.Thread

    class Held(real):  # type: ignore[misc, valid-type]
        def run(self) -> None:
            if self.name.startswith("pipe-q:"):
                gate.wait(20)
            super().run()

        def start(self) -> None:
            super().start()
            if self.name.startswith("pipe-q:"):
                raise KeyboardInterrupt

    node = make_node(tmp_path / "n", unique("m"))
    try:
        monkeypatch.setattr(threading, "Thread", Held)
        with pytest.raises(KeyboardInterrupt):
            WorkQueue(node, unique("q"))
        monkeypatch.setattr(threading, "Thread", real)
        held = _threads("pipe-q:")
        assert held, "the I/O thread was spawned"
    finally:
        monkeypatch.setattr(threading, "Thread", real)
        with caplog.at_level(logging.ERROR):
            node.close()  # the queue's close runs first: its I/O thread has not run yet
            gate.set()
            wait_until(lambda: not any(t.is_alive() for t in held), timeout=20)
    crashed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashed, crashed
