"""``Node.send_now``: control messages sent from the calling thread at once (mesh/channel.py).

Real nodes and sockets in one process: one multipart in order, typed errors with nothing of
a refused call sent, never ahead of what the same thread queued with ``send``, and safe from
several threads while the reactor sends on the same links.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ClosedError, FrameTooLarge, PeerUnreachable, ProtocolError
from mesh.node import Node, PresenceConfig
from mesh.peers import PeerState
from tests.util import unique, wait_until

FAST = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=1.0)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[..., tuple[Node, Node]]]:
    nodes: list[Node] = []
    mesh = unique("mesh")

    def make(**kw: Any) -> tuple[Node, Node]:
        a = Node(data_dir=tmp_path / "a", name="a", mesh=mesh, interface="127.0.0.1",
                 mdns=False, presence=FAST, **kw)
        nodes.append(a)
        ep = next(e for e in a.info().endpoints["control"] if e.startswith("tcp"))
        b = Node(data_dir=tmp_path / "b", name="b", mesh=mesh, interface="127.0.0.1",
                 mdns=False, presence=FAST, static_peers=(ep,), **kw)
        nodes.append(b)
        wait_until(lambda: a.peers.state(b.id) is PeerState.JOINED
                   and b.peers.state(a.id) is PeerState.JOINED, 5, what="joined")
        return a, b

    yield make
    for n in reversed(nodes):
        n.close()


def test_send_now_sends_in_order_and_refuses_with_typed_errors(
        pair: Callable[..., tuple[Node, Node]]) -> None:
    a, b = pair(max_message_bytes=1000)
    got: list[tuple[str, str, Any]] = []
    for kind in ("t.one", "t.two", "t.end"):
        a.handle(kind, lambda p, body, k=kind: got.append((p, k, body)))
    b.send_now(a.id, [("t.one", 1), ("t.two", {"x": b"y"})])
    wait_until(lambda: len(got) == 2, 5, what=lambda: got)
    assert got == [(b.id, "t.one", 1), (b.id, "t.two", {"x": b"y"})]
    with pytest.raises(PeerUnreachable):
        b.send_now("f" * 32, [("t.one", 1)])
    # A bad message anywhere in the call: typed error, and nothing of the call is sent.
    for bad, exc in (([("t.one", 2), ("ping", None)], ProtocolError),
                     ([("t.one", 2), ("Bad Kind", None)], ProtocolError),
                     ([("t.one", 2), ("t.two", b"x" * 2000)], FrameTooLarge),
                     ([("t.one", 2), ("t.two", object())], ProtocolError)):
        with pytest.raises(exc):
            b.send_now(a.id, bad)
    b.send_now(a.id, [])  # nothing to send: no error
    # More than one multipart may carry (the receiver refuses a bigger one whole): cut.
    many: list[Any] = []
    a.handle("t.big", lambda p, body: many.append(body))
    b.send_now(a.id, [("t.big", b"x" * 900)] * 100)
    wait_until(lambda: len(many) == 100, 5, what=lambda: len(many))
    b.send(a.id, "t.end", None)
    wait_until(lambda: got[-1][1] == "t.end", 5, what=lambda: got)
    assert [k for _, k, _ in got] == ["t.one", "t.two", "t.end"]
    # In the reactor thread (a handler) it is a plain queued send.
    a.handle("t.ask", lambda p, body: a.send_now(p, [("t.answer", body)]))
    answers: list[Any] = []
    b.handle("t.answer", lambda p, body: answers.append(body))
    b.send_now(a.id, [("t.ask", 7)])
    wait_until(lambda: answers == [7], 5, what=lambda: answers)
    b.close()
    with pytest.raises(ClosedError):
        b.send_now(a.id, [("t.one", 1)])


def test_send_now_never_overtakes_what_the_same_thread_queued(
        pair: Callable[..., tuple[Node, Node]]) -> None:
    a, b = pair()
    got: list[int] = []
    a.handle("t.seq", lambda p, body: got.append(body))
    n = 3000
    for i in range(n):
        if i % 3 == 2:
            b.send_now(a.id, [("t.seq", i)])  # right behind a send() still queued
        else:
            b.send(a.id, "t.seq", i)
    wait_until(lambda: len(got) >= n, 10, what=lambda: len(got))
    assert got == list(range(n))


def test_send_now_from_threads_while_the_reactor_sends_on_the_same_link(
        pair: Callable[..., tuple[Node, Node]]) -> None:
    a, b = pair()
    got: dict[str, list[int]] = {}
    lock = threading.Lock()

    def on(p: str, body: Any) -> None:
        with lock:
            got.setdefault(body[0], []).append(body[1])

    a.handle("t.m", on)
    n = 1500
    # The reactor sends on the same link too: b answers every ping of a with a message.
    b.handle("t.ping", lambda p, body: b.send(p, "t.m", ["reactor", body]))
    errors: list[BaseException] = []

    def sender(name: str, now: bool) -> None:
        try:
            for i in range(n):
                if now:
                    b.send_now(a.id, [("t.m", [name, i])])
                else:
                    b.send(a.id, "t.m", [name, i])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(f"now{k}", True)) for k in range(3)]
    threads.append(threading.Thread(target=sender, args=("queued", False)))
    for t in threads:
        t.start()
    for i in range(n):
        a.send(b.id, "t.ping", i)
    for t in threads:
        t.join(30)
    assert not errors, errors
    names = ("now0", "now1", "now2", "queued", "reactor")
    wait_until(lambda: all(len(got.get(k, ())) >= n for k in names), 15,
               what=lambda: {k: len(v) for k, v in got.items()})
    for k in names:
        assert got[k] == list(range(n)), k  # each sender's messages whole and in order
    assert a.stats().get("malformed", 0) == 0
