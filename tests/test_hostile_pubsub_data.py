"""Hostile peers on the pub/sub data path (spoofed publisher, forged heartbeat,
subscription flood).

Real nodes on 127.0.0.1, attackers with raw pyzmq sockets: an impostor node that offers the
stream on data sockets of its own (a ROUTER under the protocol-2 role ``pubsub`` and an XPUB
under the protocol-1 role ``pub``, so the attack meets whichever the subscriber speaks) and
stamps DATA / HEARTBEAT with the real publisher's id; and a flooding child process with four
sockets sending random subscriptions to the publisher's data socket, plaintext and under CURVE
with an admitted key that may subscribe to one stream only. After each attack: no forged
event or head delivered, real traffic correct, the counters moved, RSS and the publisher's
subscription table back within a stated bound, log lines limited.

Bounds asserted for the floods (2 s, four sockets in a child process): the publisher's reactor
runs a no-op within 1.5 s throughout, its RSS grows by less than 64 MiB (during and after),
it holds at most 16 subscriptions per attacking connection and gives them all back within
10 s of the attacker's SIGKILL, its fds return to within 2 of the start and no thread is
added, fewer than 100 pub/sub log lines are written, and every real event arrives in order.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh.envelope import Event, encode
from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from patterns.pubsub import frames
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import REPO, ctrl, make_node, poll_until, unique, wait_until

DATA_ROLE = "pubsub"  # literals, not frames.DATA_ROLE: the attack also runs against protocol 1
OLD_ROLE = "pub"
HUGE_HEAD = 1 << 62


def _node(path: Path, mesh: str, peers: tuple[str, ...] = ()) -> Node:
    """A plaintext node on 127.0.0.1, tcp only (the attacks are network ones)."""
    return Node(data_dir=path, name=path.name, mesh=mesh, mdns=False, interface="127.0.0.1",
                static_peers=peers, transports=("tcp",))


def _rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Count(logging.Handler):
    """Counts the records of the pub/sub logger (the log-flood check)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def pubsub_log() -> Iterator[_Count]:
    h = _Count()
    lg = logging.getLogger("zeromesh.pubsub")
    lg.addHandler(h)
    try:
        yield h
    finally:
        lg.removeHandler(h)


class Impostor:
    """Data sockets of an attacker node: a ROUTER (protocol 2) and an XPUB (protocol 1) bound
    and announced through the attacker's node, offering ``stream``."""

    def __init__(self, node: Node, stream: str) -> None:
        self.node = node
        self.router = node.socket(zmq.ROUTER, DATA_ROLE)
        self.router.setsockopt(zmq.LINGER, 0)
        node.bind(self.router, DATA_ROLE)
        self.xpub = node.socket(zmq.XPUB, OLD_ROLE)
        self.xpub.setsockopt(zmq.LINGER, 0)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        node.bind(self.xpub, OLD_ROLE)
        self.rids: list[bytes] = []
        self.asked = 0
        node.offer("stream", stream)

    def poll(self) -> int:
        """Read subscription requests (either protocol); how many were seen so far."""
        while self.router.poll(0):
            rid = self.router.recv_multipart()[0]
            self.asked += 1
            if rid not in self.rids:
                self.rids.append(rid)
        while self.xpub.poll(0):
            if self.xpub.recv()[:1] == b"\x01":
                self.asked += 1
        return self.asked

    def send(self, msg: list[bytes]) -> None:
        self.poll()
        for rid in self.rids:
            try:
                self.router.send_multipart([rid, *msg], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        try:
            self.xpub.send_multipart(msg, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.router.close(linger=0)
        self.xpub.close(linger=0)


def _forged(stream: str, real_id: str, n: int) -> list[list[bytes]]:
    """DATA of seqs 0..n-1 and a heartbeat of head 2^62, all naming ``real_id``."""
    pub = bytes.fromhex(real_id)
    envs = [encode(Event(type="t", source="impostor", stream=stream, seq=i, data=f"forged-{i}"))
            for i in range(n)]
    epoch = 0
    return [frames.encode_data(stream.encode(), pub, epoch, 0, envs, True),
            frames.encode_heartbeat(stream.encode(), pub, epoch, HUGE_HEAD, True)]


def _spoof_and_check(a: Node, b: Node, imp: Impostor, stream: str, pub: Publisher,
                     sub: Subscriber, *, heartbeats_only: bool = False) -> None:
    """The impostor floods forged DATA / heartbeats naming ``a``; then ``a`` publishes for
    real. Asserts nothing forged is delivered and the real events all are, in order."""
    wait_until(lambda: (sub.recv(timeout=0.02), imp.poll())[1] > 0, 10,
               what="the subscriber dialled the impostor")
    msgs = _forged(stream, a.id, 100)
    if heartbeats_only:
        msgs = msgs[1:]
    got: list[Any] = []
    end = time.monotonic() + 1.0  # an attack of about a second (the condition ends it)

    def attacked() -> bool:
        for m in msgs:
            imp.send(m)
        got.extend(e.data for e in sub.recv_batch(timeout=0.02))
        forged = getattr(sub.stats(), "forged_data", 0)
        return forged >= 10 * len(msgs) or time.monotonic() > end or bool(got)

    wait_until(attacked, 10, what="the attack ran")
    assert not any(str(d).startswith("forged") for d in got), got[:5]
    # Heads came only from the owner: the lag is what the real publisher announced.
    assert sub.stats().lag < 1000, sub.stats()
    real = [f"real-{i}" for i in range(100)]
    for d in real:
        pub.publish(d)

    def drained() -> bool:
        for m in msgs:
            imp.send(m)  # still attacking while the real events flow
        got.extend(e.data for e in sub.recv_batch(timeout=0.05))
        return len(got) >= 100

    poll_until(drained, 15)
    assert got == real
    st = sub.stats()
    assert st.forged_data >= len(msgs)
    assert st.lag == 0, st
    # No replay storm against the real publisher (the 2^62 head never reached the tracker).
    assert st.replay_requests < 20, st
    assert pub.stats().replay_requests < 20


def test_spoofed_publisher_and_forged_heartbeat_are_dropped_and_counted(
        tmp_path: Path, pubsub_log: _Count) -> None:
    mesh = unique("spoof")
    stream = unique("sp")
    with make_node(tmp_path / "a", mesh) as a, \
            make_node(tmp_path / "b", mesh, (ctrl(a),)) as b, \
            make_node(tmp_path / "c", mesh, (ctrl(b),)) as c:
        wait_until(lambda: b.peers.get(a.id) is not None and b.peers.get(c.id) is not None,
                   10, what="peered")
        imp = Impostor(c, stream)
        try:
            with Publisher(a, stream) as pub, \
                    Subscriber(b, stream, start=Start.beginning()) as sub:
                _spoof_and_check(a, b, imp, stream, pub, sub)
        finally:
            imp.close()
    forged_lines = [r for r in pubsub_log.records if "naming publisher" in r.getMessage()]
    assert 1 <= len(forged_lines) <= 15  # rate-limited: a burst, then one per interval


def test_forged_heartbeat_alone_never_reaches_the_gap_logic(tmp_path: Path) -> None:
    mesh = unique("hb")
    stream = unique("hb")
    with make_node(tmp_path / "a", mesh) as a, \
            make_node(tmp_path / "b", mesh, (ctrl(a),)) as b, \
            make_node(tmp_path / "c", mesh, (ctrl(b),)) as c:
        wait_until(lambda: b.peers.get(a.id) is not None and b.peers.get(c.id) is not None,
                   10, what="peered")
        imp = Impostor(c, stream)
        try:
            with Publisher(a, stream) as pub, \
                    Subscriber(b, stream, start=Start.beginning()) as sub:
                _spoof_and_check(a, b, imp, stream, pub, sub, heartbeats_only=True)
        finally:
            imp.close()


class SecureMesh:
    """Secured nodes on 127.0.0.1 whose permissions name each other's CURVE keys."""

    def __init__(self, tmp: Path, names: tuple[str, ...]) -> None:
        self.tmp = tmp
        self.keys = {n: generate_keypair() for n in names}
        (tmp / "allow").mkdir()
        for n, kp in self.keys.items():
            write_keypair(tmp / "keys", n, kp)
            shutil.copy(tmp / "keys" / f"{n}.key", tmp / "allow" / f"{n}.key")
        self.name = unique("hsec")
        self.nodes: dict[str, Node] = {}

    def pk(self, n: str) -> str:
        return self.keys[n].public

    def start(self, perms: dict[str, dict[str, tuple[str, ...]]]) -> list[Node]:
        for n in self.keys:
            seeds = tuple(m.info().endpoints["control"][0] for m in self.nodes.values())
            keys = {m.info().endpoints["control"][0]: self.pk(k) for k, m in self.nodes.items()}
            sec = SecurityConfig(key_file=self.tmp / "keys" / f"{n}.key_secret",
                                 allowlist_dir=self.tmp / "allow", peer_keys=keys,
                                 permissions=perms.get(n, {}))
            self.nodes[n] = Node(data_dir=self.tmp / n, name=n, mesh=self.name, mdns=False,
                                 transports=("tcp",), interface="127.0.0.1", security=sec,
                                 static_peers=seeds)
        nodes = list(self.nodes.values())
        wait_until(lambda: all(x.peers.get(y.id) is not None for x in nodes for y in nodes
                               if x is not y), 10, what="secured nodes joined")
        return nodes

    def close(self) -> None:
        for nd in reversed(list(self.nodes.values())):
            nd.close()


def test_spoofed_publisher_under_curve_with_an_insider_key(tmp_path: Path) -> None:
    # c holds an admitted key allowed exactly publish/subscribe/replay on the stream.
    stream = unique("cs")
    m = SecureMesh(tmp_path, ("a", "b", "c"))
    pk = m.pk
    try:
        a, b, c = m.start({
            "a": {pk("b"): ("subscribe:*", "replay:*")},
            "b": {pk("a"): ("publish:*",),
                  pk("c"): (f"publish:{stream}", f"subscribe:{stream}", f"replay:{stream}")},
            "c": {pk("b"): ("subscribe:*", "replay:*")},
        })
        imp = Impostor(c, stream)
        try:
            with Publisher(a, stream) as pub, \
                    Subscriber(b, stream, start=Start.beginning()) as sub:
                _spoof_and_check(a, b, imp, stream, pub, sub)
        finally:
            imp.close()
    finally:
        m.close()


# --- subscription flood --------------------------------------------------------------------

FLOOD = r"""
import os, signal, sys, time, zmq
ep, role, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
keys = sys.argv[4:7]
ctx = zmq.Context()
socks = []
for _ in range(4):
    s = ctx.socket(zmq.DEALER if role == "pubsub" else zmq.XSUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 100000)
    if keys:
        s.setsockopt(zmq.CURVE_SERVERKEY, keys[0].encode())
        s.setsockopt(zmq.CURVE_PUBLICKEY, keys[1].encode())
        s.setsockopt(zmq.CURVE_SECRETKEY, keys[2].encode())
    s.setsockopt(zmq.IMMEDIATE, 1)  # writable only once connected (and handshaken)
    s.connect(ep)
    socks.append(s)
for s in socks:  # wait until each is connected, with a deadline
    if not s.poll(5000, zmq.POLLOUT):
        sys.exit("not connected within 5 s")
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s in socks:
        for _ in range(64):
            topic = os.urandom(24).hex().encode()
            try:
                if role == "pubsub":
                    s.send_multipart([b"\x01\x01\x01\x00", topic], zmq.NOBLOCK)
                else:
                    s.send(b"\x01" + topic, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
print(sent, flush=True)
signal.pause()  # connected and silent until killed
"""


def _flood(endpoints: dict[str, tuple[str, ...]], seconds: float,
           keys: tuple[str, str, str] | None = None) -> subprocess.Popen[str]:
    role = DATA_ROLE if endpoints.get(DATA_ROLE) else OLD_ROLE
    ep = next(e for e in endpoints[role] if e.startswith("tcp"))
    return subprocess.Popen([sys.executable, "-c", FLOOD, ep, role, str(seconds),
                             *(keys or ())], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})


def _responsive(nd: Node) -> float:
    """Seconds the node's reactor took to run a no-op (a frozen node takes seconds)."""
    t = time.monotonic()
    try:
        nd.reactor.run_sync(lambda: None, timeout=3.0)
    except Exception:
        return 3.0
    return time.monotonic() - t


def _flood_and_check(a: Node, b: Node, stream: str, pubsub_log: _Count,
                     keys: tuple[str, str, str] | None, what: str) -> None:
    """A floods a's data socket for 2 s while b's subscriber reads a's stream for real."""
    with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.beginning()) as sub:
        pub.publish("warm")
        ev = sub.recv(timeout=10)
        assert ev is not None and ev.data == "warm"
        base = _rss_bytes()
        fds0, threads0 = len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
        pubsub_log.records.clear()
        proc = _flood(a.info().endpoints, 2.0, keys)
        try:
            got: list[Any] = []
            worst = 0.0
            peak = base
            published = 0
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                pub.publish(published)
                published += 1
                got.extend(e.data for e in sub.recv_batch(timeout=0.05))
                worst = max(worst, _responsive(a))
                peak = max(peak, _rss_bytes())
            sent = int(proc.stdout.readline() or 0) if proc.stdout else 0
            assert sent > 1000, f"the {what} flood did not run ({sent} sent)"
            # Real traffic: every event of the flood's time, in order.
            poll_until(lambda: (got.extend(e.data for e in sub.recv_batch(timeout=0.05)),
                                len(got) >= published)[1], 15)
            assert got == list(range(published))
            assert worst < 1.5, f"{what}: the publisher's reactor froze for {worst:.1f} s"
            assert peak - base < 64 << 20, f"{what}: RSS grew {(peak - base) >> 20} MiB"
            hub = pub._hub
            with hub.lock:
                b_stats = hub.budget_stats()
            assert b_stats["subscriptions_refused"] > 100, b_stats
            assert b_stats["subscriptions_held"] <= 4 * 16 + 1, b_stats
            lines = len(pubsub_log.records)
            assert lines < 100, f"{what}: {lines} log lines"
            print(f"{what} flood: {sent} requests sent, {b_stats}, reactor worst {worst:.3f} s, "
                  f"RSS +{(peak - base) >> 20} MiB, {lines} log lines")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            if proc.stdout:
                proc.stdout.close()
        # The attacker left: its subscriptions go back (only b's one stays), RSS stays bounded.
        wait_until(lambda: hub.sub_conn.held() <= 1 and len(hub.conns) <= 1, 10,
                   what="the attacker's subscriptions returned")
        assert _rss_bytes() - base < 64 << 20
        # The attacker's connections are gone on our side too; no thread was started for it.
        wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds0 + 2, 10,
                   what="the attacker's fds closed")
        assert len(os.listdir("/proc/self/task")) <= threads0
        pub.publish("after")
        wait_until(lambda: any(e.data == "after" for e in sub.recv_batch(timeout=0.05)), 10,
                   what="real traffic after the flood")


def test_subscription_flood_is_budgeted_plaintext(tmp_path: Path, pubsub_log: _Count) -> None:
    mesh = unique("flood")
    with _node(tmp_path / "a", mesh) as a, \
            _node(tmp_path / "b", mesh, (ctrl(a),)) as b:
        wait_until(lambda: b.peers.get(a.id) is not None, 10, what="peered")
        _flood_and_check(a, b, unique("fl"), pubsub_log, None, "plaintext")


def test_subscription_flood_under_curve_with_an_insider_key(tmp_path: Path,
                                                             pubsub_log: _Count) -> None:
    # c's key is admitted and may subscribe to one stream; it floods a with others.
    stream = unique("cf")
    m = SecureMesh(tmp_path, ("a", "b", "c"))
    pk = m.pk
    try:
        a, b, _c = m.start({
            "a": {pk("b"): ("subscribe:*", "replay:*"), pk("c"): (f"subscribe:{stream}",)},
            "b": {pk("a"): ("publish:*",)},
        })
        kc = m.keys["c"]
        assert kc.secret is not None
        _flood_and_check(a, b, stream, pubsub_log, (pk("a"), kc.public, kc.secret), "CURVE")
    finally:
        m.close()


def test_over_budget_and_malformed_requests_get_a_typed_refusal(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    with make_node(tmp_path / "a", unique("bud")) as a, Publisher(a, unique("bu")) as pub:
        hub = pub._hub
        raw = zctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(next(e for e in pub.endpoints if e.startswith("tcp")))
        try:
            n = 20
            for i in range(n):
                raw.send_multipart(frames.encode_subscribe(b"t%d" % i, prefix=False))
            raw.send_multipart([b"\x09\x01\x00\x00", b"x"])  # a wrong version: malformed
            reasons: list[int] = []
            while len(reasons) < n - 16 + 1 and raw.poll(5000):
                _topic, head, _ = frames.decode_message(raw.recv_multipart(), max_event_size=1)
                if head.kind == frames.KIND_REFUSED:
                    reasons.append(head.count)
            assert sorted(reasons) == [frames.REFUSED_BUDGET] * (n - 16) + [
                frames.REFUSED_MALFORMED]
            with hub.lock:
                st = hub.budget_stats()
            assert st["subscriptions_held"] == 16 and st["subscriptions_refused"] == n - 16 + 1
            assert st["subscriptions_refused_by_budget"] == n - 16
            # Unsubscribing gives the budget back; a gone connection gives back the rest.
            raw.send_multipart(frames.encode_subscribe(b"t0", prefix=False, unsubscribe=True))
            wait_until(lambda: hub.sub_conn.held() == 15, 5, what="unsubscribed")
        finally:
            raw.close(linger=0)
        wait_until(lambda: hub.sub_conn.held() == 0 and not hub.conns, 10,
                   what="a closed connection's subscriptions returned")
        assert "pubsub_subscriptions_refused_total" in _metrics_text(a)


def _metrics_text(nd: Node) -> str:
    from mesh.metrics import render_prometheus
    return render_prometheus(nd)


def test_refused_subscriber_counts_it_and_logs_once(tmp_path: Path, pubsub_log: _Count) -> None:
    # b's key may not subscribe to the stream on a: a refuses with a typed notice.
    stream = unique("rf")
    m = SecureMesh(tmp_path, ("a", "b"))
    pk = m.pk
    try:
        a, b = m.start({"a": {pk("b"): ("replay:*",)}, "b": {pk("a"): ("publish:*",)}})
        with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.new()) as sub:
            wait_until(lambda: (sub.recv(timeout=0.02),
                                sub.stats().subscriptions_refused)[1] >= 1, 10,
                       what="refusal counted")
            for conn in list(sub._conns.values()):  # ask again twice: counted, not logged
                sub._subscribe(conn)
                sub._subscribe(conn)
            wait_until(lambda: (sub.recv(timeout=0.02),
                                sub.stats().subscriptions_refused)[1] >= 3, 10,
                       what="refusals counted")
            pub.publish("secret")
            assert sub.recv(timeout=0.3) is None
            assert "subscriptions_refused_total" in _metrics_text(b)
            assert "forged_data_total" in _metrics_text(b)
        lines = [r for r in pubsub_log.records if "refused the subscription" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
    finally:
        m.close()


def test_a_protocol_1_publisher_is_counted_and_said_once(tmp_path: Path,
                                                         pubsub_log: _Count) -> None:
    # An old publisher announces an XPUB under "pub" and no "pubsub": nothing to connect to.
    mesh = unique("old")
    stream = unique("ol")
    with _node(tmp_path / "a", mesh) as a, _node(tmp_path / "b", mesh, (ctrl(a),)) as b:
        xpub = a.socket(zmq.XPUB, OLD_ROLE)
        try:
            a.bind(xpub, OLD_ROLE)
            a.offer("stream", stream)
            with Subscriber(b, stream, start=Start.new()) as sub:
                wait_until(lambda: (sub.recv(timeout=0.02), sub.stats().old_publishers)[1] >= 1,
                           10, what="old publisher seen")
                assert not sub._connected
                a.offer("stream", stream + ".x")  # a CHANGED event: counted, not logged again
                wait_until(lambda: (sub.recv(timeout=0.02), sub.stats().old_publishers)[1] >= 2,
                           10, what="seen again")
        finally:
            xpub.close(linger=0)
    lines = [r for r in pubsub_log.records if "protocol 1" in r.getMessage()]
    assert len(lines) == 1


def test_subscription_request_decoder_refuses_garbage_with_typed_errors() -> None:
    import random

    from mesh.errors import ProtocolError, UnsupportedVersion
    rng = random.Random(17)
    ok = frames.encode_subscribe(b"a.b", prefix=True)
    assert frames.decode_subscribe(ok) == (frames.OP_SUBSCRIBE, "a.b", True)
    assert frames.decode_subscribe(frames.encode_subscribe(b"", prefix=True))[1] == ""
    for _ in range(3000):
        n = rng.randrange(0, 4)
        msg = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 8))) for _ in range(n)]
        if n == 2 and rng.random() < 0.5:
            msg[0] = bytes([1, rng.randrange(4), rng.randrange(4), 0])
        try:
            op, topic, _prefix = frames.decode_subscribe(msg)
        except (ProtocolError, UnsupportedVersion):
            continue
        assert op in (frames.OP_SUBSCRIBE, frames.OP_UNSUBSCRIBE) and len(topic) <= 255
