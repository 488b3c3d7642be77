"""Pub/sub wiring when peers join or restart: offers must reach subscribers whatever the timing.

Regression for the flaky publisher-kill test: a publisher node whose stream offer was made after
its HELLO went out but before the peer answered it never announced the offer to that peer (the
node core sent UPDATE to live peers only; fixed in the node core, which now also sends UPDATE
to pending dials), so the subscriber never connected.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from mesh.node import Node
from patterns.pubsub.gaps import StreamTracker
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import ctrl, unique, wait_until


def make_node(path: Path, mesh: str, peers: tuple[str, ...] = (),
              transports: tuple[str, ...] = ("tcp", "ipc")) -> Node:
    return Node(data_dir=path, name=path.name, mesh=mesh, mdns=False, interface="127.0.0.1",
                static_peers=peers, transports=transports)



def test_offer_made_before_hello_answered_still_reaches_subscriber(tmp_path: Path) -> None:
    mesh = unique("ps")
    with make_node(tmp_path / "sub", mesh) as a, Subscriber(a, "j.s", start=Start.beginning()) as sub:
        # Hold the subscriber node's reactor so the publisher's HELLO (sent while it offers
        # nothing yet) is answered only after its Publisher offered the stream.
        gate = threading.Event()
        held = threading.Event()

        def hold() -> None:
            held.set()
            gate.wait(5)

        a.reactor.call_soon(hold)
        assert held.wait(5)
        with make_node(tmp_path / "pub", mesh, (ctrl(a),)) as b, Publisher(b, "j.s") as pub:
            gate.set()
            wait_until(lambda: a.id in {p.node_id for p in b.peers.list()}, 5,
                       what="peering")
            pub.publish_many(range(10), type="t")
            got: list[int] = []
            wait_until(lambda: got.extend(e.data for e in sub.recv_batch(timeout=0.05))
                       or len(got) >= 10, 10, what="events from the late offer")
            assert got == list(range(10))


def _squat(endpoint: str) -> socket.socket:
    """Take ``endpoint``'s tcp port (listening, so libzmq's REUSEADDR bind fails on it) once
    the closed hub's listener has gone (REUSEADDR: the old connections' TIME_WAIT does not
    stop us)."""
    squat = socket.socket()
    squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def squatted() -> bool:
        try:
            squat.bind(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
        except OSError:
            return False
        squat.listen()
        return True

    wait_until(squatted, 5, what="the old data port free")
    return squat


@pytest.mark.parametrize("port_taken", [True, False], ids=["new-port", "recorded-port"])
def test_restarted_publisher_is_heard_again(tmp_path: Path, port_taken: bool) -> None:
    """Same data dir, same node id, no wait for LEFT (it comes back at once). Its recorded
    data port is bound again when free: the subscriber's connection (libzmq reconnects by
    itself) carries the new events; when the port is taken the hub moves, and the subscriber
    follows the new endpoint and drops the dead one."""
    mesh = unique("ps")
    tcp = ("tcp",)  # tcp only: the port is what this is about
    with make_node(tmp_path / "sub", mesh, transports=tcp) as a, Subscriber(
            a, "r.s", start=Start.beginning()) as sub:
        pdir = tmp_path / "pub"
        got: list[int] = []

        def pull(n: int) -> bool:
            got.extend(e.data for e in sub.recv_batch(timeout=0.05))
            return len(got) >= n

        with make_node(pdir, mesh, (ctrl(a),), transports=tcp) as b, Publisher(b, "r.s") as p:
            first_ep = p.endpoints[0]
            p.publish_many(range(5), type="t")
            wait_until(lambda: pull(5), 10, what="first incarnation's events")
        with contextlib.ExitStack() as stack:
            if port_taken:
                stack.enter_context(_squat(first_ep))
            b = stack.enter_context(make_node(pdir, mesh, (ctrl(a),), transports=tcp))
            p = stack.enter_context(Publisher(b, "r.s"))
            assert (p.endpoints[0] != first_ep) == port_taken
            p.publish_many(range(5, 10), type="t")
            wait_until(lambda: pull(10), 10, what="restarted publisher's events")
            assert got == list(range(10))
            # Only the live endpoint stays connected.
            assert sub._connected == {p.endpoints[0]}


def test_peer_restart_resends_outstanding_request_at_once() -> None:
    t = StreamTracker(0, retry_s=60.0)
    ask = t.start(0.0).ask
    assert ask is not None and t.on_tick(1.0).ask is None
    again = t.on_peer_restart(1.0).ask
    assert again is not None and again.req != ask.req and again.start == 0
    assert t.stats.replay_retries == 1
    # The reply to the request lost with the old incarnation is now stale.
    assert t.on_replay(ask.req, 0, [b"x"], 1, 0, False, 1.1).deliver == []
    assert t.on_replay(again.req, 0, [b"x"], 1, 0, False, 1.1).deliver == [(0, [b"x"])]
