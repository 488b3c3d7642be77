"""Presence and dials under faults on a static peer's control link (chaos finding 2).

Node A dials its static peer B through a small userspace TCP proxy (threads + sockets) that can
*stall* (stop forwarding both ways, connections kept, bytes left in the kernel buffers) or *cut*
(close every connection, refuse new ones) the link; B's DEALER back to A is direct, like in the
chaos mesh. After each fault A and B must be joined again within a bound and exchange a control
message both ways.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh.node import Node, PresenceConfig
from mesh.peers import PeerState
from tests.node_child import CODE as CHILD_CODE
from tests.tcp_proxy import Proxy
from tests.util import python_child, unique, wait_until

HB, EVASIVE, GONE = 0.1, 0.3, 1.0
FAST = PresenceConfig(heartbeat_s=HB, evasive_s=EVASIVE, gone_s=GONE)
#: After a fault ends: a few gone intervals to rejoin (a redial plus a HELLO round trip).
REJOIN_S = 6.0


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []
    mesh = unique("mesh")

    def make(name: str, **kw: Any) -> Node:
        kw.setdefault("mesh", mesh)
        kw.setdefault("presence", FAST)
        node = Node(data_dir=tmp_path / name, name=name, interface="127.0.0.1", mdns=False,
                    transports=("tcp",), **kw)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.close()


@pytest.fixture
def make_proxy() -> Iterator[Callable[[str], Proxy]]:
    proxies: list[Proxy] = []

    def make(target: str) -> Proxy:
        p = Proxy(target)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


def control_ep(node: Node) -> str:
    return next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))


def joined(a: Node, b: Node) -> bool:
    return a.peers.state(b.id) is PeerState.JOINED and b.peers.state(a.id) is PeerState.JOINED


def diag(*nodes: Node) -> str:
    out = []
    for n in nodes:
        s = n.stats()
        states = {r.info.name: r.state.value for r in n.peers.records()}
        out.append(f"{n.name}: peers={states} links={s['links']} dials={s['dials']}")
    return "; ".join(out)


class Exchange:
    """A ``t.ping`` handler on each node; :meth:`check` sends one each way and waits for it."""

    def __init__(self, *nodes: Node) -> None:
        self.got: dict[str, list[tuple[str, Any]]] = {n.id: [] for n in nodes}
        for n in nodes:
            n.handle("t.ping", lambda peer, body, n=n: self.got[n.id].append((peer, body)))
        self.n = 0

    def check(self, a: Node, b: Node, timeout: float) -> None:
        """Send one message each way (retrying while the peer is not reachable yet)."""
        self.n += 1
        tag = self.n

        def delivered(src: Node, dst: Node) -> bool:
            if (src.id, tag) in self.got[dst.id]:
                return True
            try:
                src.send(dst.id, "t.ping", tag)
            except Exception:
                return False
            return (src.id, tag) in self.got[dst.id]

        wait_until(lambda: delivered(a, b) and delivered(b, a), timeout,
                   interval=0.05, what=f"exchange {tag}: {diag(a, b)}")


def fault(proxy: Proxy, kind: str, seconds: float) -> None:
    """Apply one fault for ``seconds`` (the fault's duration is the point: not a test wait)."""
    ev = proxy.stalled if kind == "stall" else proxy.cut
    ev.set()
    time.sleep(seconds)  # the fault's length, like the chaos suite's schedule
    ev.clear()


FAULTS = [("stall", 1.4), ("cut", 1.4), ("stall", 0.6), ("cut", 0.3), ("stall", 2.2)]


def test_static_peer_through_stalled_and_cut_proxy_always_rejoins(
    make_node: Callable[..., Node], make_proxy: Callable[[str], Proxy]
) -> None:
    b = make_node("b")
    proxy = make_proxy(control_ep(b))
    a = make_node("a", static_peers=(proxy.endpoint,))
    ex = Exchange(a, b)
    wait_until(lambda: joined(a, b), 5, what="initial join")
    ex.check(a, b, 5)
    for kind, seconds in FAULTS:
        fault(proxy, kind, seconds)
        wait_until(lambda: joined(a, b), REJOIN_S, what=f"rejoin after {kind} {seconds}s: "
                   f"{diag(a, b)}")
        ex.check(a, b, REJOIN_S)
    # Never a second DEALER left behind: one link each way, no pending dial.
    wait_until(lambda: a.stats()["links"] == 1 and a.stats()["dials"] == 0, REJOIN_S,
               what=f"one link, no dial: {diag(a, b)}")


def test_three_nodes_with_gossip_rejoin_after_static_link_faults(
    make_node: Callable[..., Node], make_proxy: Callable[[str], Proxy]
) -> None:
    hub = make_node("hub")
    proxy_a = make_proxy(control_ep(hub))
    proxy_c = make_proxy(control_ep(hub))
    a = make_node("a", static_peers=(proxy_a.endpoint,))
    c = make_node("c", static_peers=(proxy_c.endpoint,))
    ex = Exchange(a, hub, c)
    wait_until(lambda: joined(a, hub) and joined(c, hub) and joined(a, c), 5,
               what=f"initial join: {diag(a, hub, c)}")
    for kind, seconds in FAULTS:
        fault(proxy_a, kind, seconds)
        wait_until(lambda: joined(a, hub) and joined(c, hub) and joined(a, c), REJOIN_S,
                   what=f"rejoin after {kind} {seconds}s: {diag(a, hub, c)}")
        ex.check(a, hub, REJOIN_S)
        ex.check(a, c, REJOIN_S)


def test_static_peer_rejoins_after_repeated_sigstop_of_the_dialling_process(
    make_node: Callable[..., Node], make_proxy: Callable[[str], Proxy]
) -> None:
    """Node A (a child process) dials hub B through the proxy and is frozen longer than gone_s.

    On SIGCONT A's heartbeat may run before its I/O thread delivers what B sent before the
    freeze: A marks B gone (redialling its static endpoint) and then hears B again (opening a
    direct link). Two DEALERs of A to B's ROUTER: the chaos suite's lost node.
    """
    hub = make_node("hub")
    proxy = make_proxy(control_ep(hub))
    got: list[Any] = []
    hub.handle("test.msg", lambda peer, body: got.append((peer, body)))
    child = python_child(CHILD_CODE, json.dumps({
        "data_dir": str(Path(hub.data_dir).parent / "a"), "name": "a", "mesh": hub.mesh,
        "interface": "127.0.0.1", "transports": ["tcp"], "static_peers": [proxy.endpoint],
        "presence": [HB, EVASIVE, GONE]}), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        a_id = json.loads(child.stdout.readline())["id"]

        def a_joined() -> bool:
            return hub.peers.state(a_id) is PeerState.JOINED

        def echo(tag: int) -> bool:
            if (a_id, tag) in got:
                return True
            try:
                hub.send(a_id, "test.echo", tag)
            except Exception:
                return False
            return (a_id, tag) in got

        wait_until(a_joined, 10, what="initial join")
        for i in range(8):
            child.send_signal(signal.SIGSTOP)
            time.sleep(GONE + 0.3)  # the freeze's length (the fault), not a wait for an outcome
            child.send_signal(signal.SIGCONT)
            wait_until(lambda i=i: a_joined() and echo(i), REJOIN_S, interval=0.05,
                       what=f"rejoin after SIGSTOP {i}: {diag(hub)}")
    finally:
        child.kill()
        child.wait(5)


def test_static_dial_stranded_by_a_second_dealer_is_redialled(
    make_node: Callable[..., Node], make_proxy: Callable[[str], Proxy], zctx: zmq.Context[Any]
) -> None:
    """The root cause, deterministically: ROUTER_HANDOVER strands the older connection.

    While hub B's reactor is busy, A's static dial (through the proxy) completes its ZMTP
    handshake and queues its HELLO; then a second DEALER with A's routing id (what A opens when
    it hears B directly while its static dial is pending) connects straight to B and goes away.
    B's ROUTER hands A's identity to the newcomer and never reads the first connection again,
    nor closes it (libzmq 4.3): the static dial is never answered. It must be redialled.
    """
    hub = make_node("hub")
    proxy = make_proxy(control_ep(hub))
    release = threading.Event()
    hub.reactor.call_soon(release.wait, 10)  # B busy (a long handler, a starved process)
    a = make_node("a", static_peers=(proxy.endpoint,))
    wait_until(lambda: proxy.sent_up > 200, 5, what="A's handshake and HELLO reached B")
    second = zctx.socket(zmq.DEALER)
    second.setsockopt(zmq.ROUTING_ID, a.id.encode("ascii"))
    second.setsockopt(zmq.LINGER, 0)
    mon = second.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    second.connect(control_ep(hub))
    assert mon.poll(5000), "second DEALER never completed its handshake"
    second.disable_monitor()
    mon.close(linger=0)
    second.close(linger=0)
    release.set()
    ex = Exchange(a, hub)
    wait_until(lambda: joined(a, hub), REJOIN_S, what=f"join: {diag(a, hub)}")
    ex.check(a, hub, REJOIN_S)
