"""Hostile peers against pub/sub replay and acks: raw pyzmq sockets speaking the
control protocol (docs/protocol.md: HELLO, then ``pubsub.replay`` / ``pubsub.ack`` bodies),
plaintext and under CURVE with an insider key allowed a single stream.

- A peer that floods replay requests and never reads gets at most its replay byte budget
  (``REPLAY_PEER_BYTES``), then typed ``"busy"`` refusals, then silence; the node's RSS stays
  within a stated bound and a real subscriber still replays the whole stream.
- A publisher whose heads promise more than it has (or who never answers) gets replay requests
  at most at the subscriber's per-publisher rate and outstanding count.
- Forged acks: only from peers allowed to subscribe the stream, into a bounded positions map;
  ``Publisher.stats()`` from another thread while they flood never raises.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh import control
from mesh.control import Hello
from mesh.node import Node
from mesh.peers import PeerInfo
from mesh.security import SecurityConfig
from mesh.security.keys import Keypair, generate_keypair, write_keypair
from patterns.pubsub import frames
from patterns.pubsub import publisher as pubmod
from patterns.pubsub import subscriber as submod
from patterns.pubsub.gaps import StreamTracker
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.raw_pubsub import RawPublisher
from tests.util import poll_until, unique, wait_until

MiB = 1 << 20


def _rss() -> int:
    """Resident set size of this process (the victim node lives in it), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RawPeer:
    """A hand-made mesh peer: a DEALER to the victim's control ROUTER (routing id = its node
    id), its own control ROUTER (announced; the victim dials it) and optionally a pub/sub data
    ROUTER announced as ``pubsub`` offering ``streams``. Under CURVE it holds ``key``."""

    def __init__(self, victim: Node, *, key: Keypair | None = None, reads: bool = True,
                 streams: tuple[str, ...] = ()) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.id = uuid.uuid4().hex
        self.victim = victim
        self.key = key
        r = self.ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        if not reads:
            # Never read, and hold as little as possible ourselves: what does not fit stays
            # queued on the victim's side, which is the point of the attack.
            r.setsockopt(zmq.RCVHWM, 1)
            r.setsockopt(zmq.RCVBUF, 4096)
        if key is not None:
            assert key.secret is not None
            r.curve_server = True
            r.curve_secretkey = key.secret.encode()
            r.curve_publickey = key.public.encode()
        port = r.bind_to_random_port("tcp://127.0.0.1")
        self.router = r
        eps: dict[str, tuple[str, ...]] = {"control": (f"tcp://127.0.0.1:{port}",)}
        self.pub: RawPublisher | None = None
        if streams:  # a pub/sub 2 data ROUTER (sends to every connection that subscribed)
            p = RawPublisher(self.ctx)
            pport = p.bind_to_random_port("tcp://127.0.0.1")
            eps["pubsub"] = (f"tcp://127.0.0.1:{pport}",)
            self.pub = p
        d = self.ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.ROUTING_ID, self.id.encode())
        d.setsockopt(zmq.SNDHWM, 0)
        if key is not None:
            assert key.secret is not None and victim.security is not None
            d.curve_publickey = key.public.encode()
            d.curve_secretkey = key.secret.encode()
            d.curve_serverkey = victim.security.public_key.encode()
        d.connect(next(e for e in victim.info().endpoints["control"]
                       if e.startswith("tcp://")))
        self.dealer = d
        self.info = PeerInfo(node_id=self.id, name="raw", mesh=victim.mesh,
                             public_key=key.public if key is not None else None,
                             endpoints=eps, offers={"stream": streams} if streams else {})

    def hello(self) -> None:
        body = control.encode_body(control.hello_to_wire(Hello(self.info)), 1 << 20)
        self.dealer.send_multipart(control.encode_frames([(control.HELLO, body)]))
        wait_until(lambda: self.victim.peers.get(self.id) is not None, 5, what="HELLO taken")

    def send(self, messages: list[tuple[str, object]]) -> None:
        self.dealer.send_multipart(control.encode_frames(
            [(k, control.encode_body(b, 1 << 22)) for k, b in messages]))

    def recv(self, timeout_ms: int = 0) -> list[tuple[str, Any]]:
        """Control messages the victim sent us (through its DEALER to our ROUTER)."""
        out: list[tuple[str, Any]] = []
        while self.router.poll(timeout_ms):
            timeout_ms = 0
            fr = self.router.recv_multipart()
            for m in control.decode_frames(fr[1:]):
                if m.error is None:
                    out.append((m.kind, m.body))
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _replay(stream: str, req: int, *, sid: str = "", tok: int | None = None) -> dict[str, Any]:
    """A ``pubsub.replay`` body as on the wire: everything from 0, as much as allowed."""
    body: dict[str, Any] = {"v": 1, "sid": sid or uuid.uuid4().hex, "req": req,
                            "stream": stream, "from": 0, "from_time": None, "to": None,
                            "max": 5000, "max_bytes": 4 * MiB}
    if tok is not None:
        body["tok"] = tok
    return body


def _node(tmp: Path, name: str, mesh: str, sec: SecurityConfig | None = None,
          **kw: Any) -> Node:
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=False, transports=("tcp",),
                interface="127.0.0.1", security=sec, **kw)


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[dict[str, Keypair]]:
    """a: the victim; b: an honest peer; c: the insider, allowed one stream."""
    ks = {n: generate_keypair() for n in ("a", "b", "c")}
    (tmp_path / "allow").mkdir()
    for n, kp in ks.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", tmp_path / "allow" / f"{n}.key")
    yield ks


def _sec(tmp: Path, name: str, perms: dict[str, tuple[str, ...]], **kw: Any) -> SecurityConfig:
    return SecurityConfig(key_file=tmp / "keys" / f"{name}.key_secret",
                          allowlist_dir=tmp / "allow", permissions=perms, **kw)


def _fill(pub: Publisher, n: int = 6000) -> None:
    pub.publish_many(["x" * 400 for _ in range(n)])


def _pubsub_lines(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.name == "zeromesh.pubsub"
               and r.levelno >= logging.WARNING)


def _amplification(victim: Node, attacker: RawPeer, stream: str, pub: Publisher,
                   caplog: pytest.LogCaptureFixture) -> None:
    """300 replay requests from a peer that never reads, against a 6,000-event log."""
    base = _rss()
    attacker.hello()
    for i in range(0, 300, 30):
        attacker.send([(frames.CTRL_REPLAY, _replay(stream, i + j)) for j in range(30)])
    # Every request is answered (a chunk, "busy"), or counted as not answered.
    wait_until(lambda: (lambda s: s.replay_requests + s.replay_busy + s.replay_dropped)(
        pub.stats()) >= 300, 10, what="all 300 requests handled")
    s = pub.stats()
    held = s.replay_bytes_held
    assert held <= pubmod.REPLAY_PEER_BYTES, held
    assert s.replay_busy + s.replay_dropped >= 250, s
    # Stated bound: the peer's budget (32 MiB) plus 64 MiB of slack (allocator, log reads);
    # before the budget this attack added 840 MB.
    grown = _rss() - base
    assert grown < pubmod.REPLAY_PEER_BYTES + 64 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
    assert _pubsub_lines(caplog) <= 15  # one line per request would be 300
    # the metric agrees with the stats (taken before and after it: refusals may still be
    # counted while the last requests are handled)
    fam = next(v for k, v in victim.metrics.as_dict().items() if "replay_refused_total" in k)
    after = pub.stats()
    metric = sum(x["value"] for x in fam["samples"] if x["labels"]["reason"] != "forbidden")
    assert s.replay_busy + s.replay_dropped <= metric <= after.replay_busy + after.replay_dropped


def _honest_replays_all(victim: Node, tmp: Path, stream: str, n: int,
                        sec: SecurityConfig | None = None, **node_kw: Any) -> None:
    with _node(tmp, "honest", victim.mesh, sec, **node_kw) as b:
        wait_until(lambda: victim.peers.get(b.id) is not None, 5, what="honest peer joined")
        with Subscriber(b, stream, start=Start.beginning()) as sub:
            got: list[Any] = []
            wait_until(lambda: (got.extend(sub.recv_batch(timeout=0.1)), len(got) >= n)[1],
                       20, what="the honest subscriber replays everything")
            assert [e.seq for e in got[:n]] == list(range(n))


def test_replay_amplification_is_bounded_plaintext(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "zeromesh.pubsub")
    m = unique("amp")
    with _node(tmp_path, "victim", m) as victim, Publisher(victim, unique("s")) as pub:
        _fill(pub)
        attacker = RawPeer(victim, reads=False)
        try:
            _amplification(victim, attacker, pub.stream, pub, caplog)
            # Real traffic is still served: another peer replays the whole log.
            _honest_replays_all(victim, tmp_path, pub.stream, 6000,
                                static_peers=(victim.info().endpoints["control"][0],))
        finally:
            attacker.close()


def test_replay_amplification_is_bounded_curve_insider(
        tmp_path: Path, keys: dict[str, Keypair], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "zeromesh.pubsub")
    m = unique("ampc")
    allowed, other = unique("s"), unique("t")
    perms = {keys["b"].public: ("*:*",),
             keys["c"].public: (f"publish:{allowed}", f"subscribe:{allowed}",
                                f"replay:{allowed}")}
    with _node(tmp_path, "victim", m, _sec(tmp_path, "a", perms)) as victim, \
            Publisher(victim, allowed) as pub, Publisher(victim, other) as pub2:
        _fill(pub)
        _fill(pub2, 100)
        attacker = RawPeer(victim, key=keys["c"], reads=False)
        try:
            _amplification(victim, attacker, allowed, pub, caplog)
            # A stream it may not replay: refused, and the refusals are budgeted too.
            attacker.send([(frames.CTRL_REPLAY, _replay(other, 1000 + j)) for j in range(50)])
            wait_until(lambda: victim.stats().get("security_denied_replay", 0) >= 1, 5,
                       what="forbidden replays refused")
            assert pub2.stats().replay_events == 0
            assert pub.stats().replay_bytes_held <= pubmod.REPLAY_PEER_BYTES
            ep = victim.info().endpoints["control"][0]
            _honest_replays_all(victim, tmp_path, allowed, 6000,
                                _sec(tmp_path, "b", {"*": ("*:*",)},
                                     peer_keys={ep: keys["a"].public}), static_peers=(ep,))
        finally:
            attacker.close()


def test_backlogged_peer_is_not_served(tmp_path: Path) -> None:
    """Small replies (the byte budget is far away) to a peer that never reads: once the
    node's connection to it is at its HWM, requests are answered "busy", not read from the
    log and queued."""
    with _node(tmp_path, "victim", unique("bl"), hwm=4) as victim, \
            Publisher(victim, unique("s")) as pub:
        pub.publish_many(["y" * 100 for _ in range(60)])
        attacker = RawPeer(victim, reads=False)
        try:
            attacker.hello()
            for i in range(3000):
                attacker.send([(frames.CTRL_REPLAY, _replay(pub.stream, i))])
            wait_until(lambda: (lambda s: s.replay_requests + s.replay_busy)(pub.stats())
                       >= 3000, 20, what="all requests handled")
            s = pub.stats()
            assert victim.stats().get("dropped_hwm", 0) >= 1
            assert s.replay_busy >= 1000 and s.replay_requests < 2000, s
            assert s.replay_bytes_held < pubmod.REPLAY_PEER_BYTES // 2, s
        finally:
            attacker.close()


def test_reading_peer_gets_its_budget_back(tmp_path: Path) -> None:
    """The budget is not a cap on replay volume: a peer that reads, and proves it by echoing
    the latest reply's ``tok``, is served for ever (here 3x its budget)."""
    m = unique("tok")
    with _node(tmp_path, "victim", m) as victim, Publisher(victim, unique("s")) as pub:
        _fill(pub, 3000)  # about 1.3 MB per full chunk
        peer = RawPeer(victim, reads=True)
        try:
            peer.hello()
            tok = None
            events = 0
            for req in range(80):  # ~100 MiB in all, 3x REPLAY_PEER_BYTES
                peer.send([(frames.CTRL_REPLAY, _replay(pub.stream, req, sid="r", tok=tok))])
                got: list[Any] = []

                def reply(got: list[Any] = got) -> bool:
                    got.extend(b for k, b in peer.recv(50) if k == frames.CTRL_REPLAY_DATA)
                    return bool(got)

                wait_until(reply, 5, what="a reply")
                body = got[-1]
                assert body["error"] is None, body
                events += len(body["events"])
                tok = body["tok"]
            assert events == 80 * 3000
            s = pub.stats()
            assert s.replay_busy == 0 and s.replay_bytes_held < 2 * MiB, s
        finally:
            peer.close()


def test_subscriber_replay_requests_bounded_per_publisher(tmp_path: Path) -> None:
    """A publisher whose heads and replies promise 2^62 events it never sends (or that never
    answers): the subscriber asks at most ``replay_rate`` times a second and keeps at most
    ``replay_outstanding`` requests unanswered."""
    m = unique("flood")
    base = unique("f")
    streams = tuple(f"{base}.{i}" for i in range(40))
    with _node(tmp_path, "victim", m) as victim:
        evil = RawPeer(victim, streams=streams)
        try:
            evil.hello()
            prefix = streams[0].rsplit(".", 1)[0] + "."
            with Subscriber(victim, prefix, start=Start.beginning()) as sub:
                pid = frames.node_id_bytes(evil.id)
                asked: list[float] = []
                unanswered: dict[tuple[str, int], float] = {}
                most_unanswered = 0

                def pump(answer: bool) -> None:
                    nonlocal most_unanswered
                    sub.recv_batch(timeout=0.01)
                    assert evil.pub is not None
                    for st in streams:  # forged heads: far beyond anything it has
                        evil.pub.send_multipart(frames.encode_heartbeat(
                            st.encode(), pid, 7, 1 << 62, True))
                    replies = []
                    for kind, body in evil.recv(0):
                        if kind != frames.CTRL_REPLAY:
                            continue
                        asked.append(time.monotonic())
                        unanswered[(body["stream"], body["req"])] = time.monotonic()
                        if answer:
                            replies.append((frames.CTRL_REPLAY_DATA, frames.ReplayData(
                                body["sid"], body["req"], body["stream"], body["from"] or 0,
                                [], 1 << 62, 0, False, None, 7).to_body()))
                            del unanswered[(body["stream"], body["req"])]
                    if replies:
                        evil.send(replies)
                    most_unanswered = max(most_unanswered, len(unanswered))

                # 1. It never answers: at most replay_outstanding requests at once.
                wait_until(lambda: (pump(False), len(asked) >= 1)[1], 5, what="first ask")
                t0 = time.monotonic()
                while time.monotonic() - t0 < 1.0:
                    pump(False)
                assert most_unanswered <= submod.REPLAY_OUTSTANDING, most_unanswered
                assert sub.stats().replay_deferred > 0
                # 2. It answers every request at once with nothing and an impossible head:
                # requests stay under replay_rate a second (was ~2,200 a second).
                unanswered.clear()
                asked.clear()
                t0 = time.monotonic()
                while time.monotonic() - t0 < 1.5:
                    pump(True)
                window = [t for t in asked if t >= t0 + 0.5]  # the last second
                assert len(window) <= submod.REPLAY_RATE, len(window)
                s = sub.stats()
                assert s.replay_idle > 0 and s.delivered == 0
                assert s.lag > 0  # its head is believed (another layer refuses forged heads)
        finally:
            evil.close()


def test_forged_head_for_the_real_publisher_bounded(tmp_path: Path) -> None:
    """The issue's case: a peer offering the same stream on its own data socket sends heartbeats with
    the real publisher's id and head 2^62. Whether or not the head is believed (the data path
    binds heads to the connection they came on), the real publisher gets a bounded trickle of
    replay requests, not ~2,200 a second, and real events still arrive."""
    m = unique("fh")
    stream = unique("s")
    with _node(tmp_path, "pub", m) as a, Publisher(a, stream) as pub:
        pub.publish_many(list(range(20)))
        with _node(tmp_path, "sub", m, static_peers=(
                a.info().endpoints["control"][0],)) as b:
            wait_until(lambda: b.peers.get(a.id) is not None, 5, what="joined")
            evil = RawPeer(b, streams=(stream,))
            try:
                evil.hello()
                with Subscriber(b, stream, start=Start.beginning()) as sub:
                    got: list[Any] = []
                    wait_until(lambda: (got.extend(sub.recv_batch(timeout=0.05)),
                                        len(got) >= 20)[1], 10, what="history")
                    assert evil.pub is not None
                    forged = frames.encode_heartbeat(stream.encode(), frames.node_id_bytes(a.id),
                                                     pub.stats().epoch, 1 << 62, True)
                    forger = evil.pub

                    def subscribed() -> bool:  # the subscriber asked the forger for the stream
                        sub.recv_batch(timeout=0.01)
                        forger._learn()
                        return bool(forger.rids)

                    wait_until(subscribed, 5, what="subscriber connected to the forger")
                    before = pub.stats().replay_requests
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 2.0:
                        forger.send_multipart(forged)
                        got.extend(sub.recv_batch(timeout=0.005))
                    asked = pub.stats().replay_requests - before
                    # Backoff 0.05 s doubling to retry_s (2 s): a handful in 2 s.
                    assert asked <= 12, asked
                    pub.publish("live")
                    wait_until(lambda: (got.extend(sub.recv_batch(timeout=0.05)),
                                        got[-1].data == "live")[1], 10, what="live event")
                    assert [e.seq for e in got] == list(range(21))
                    assert sub.stats().forged_data > 0  # dropped at the connection, counted
            finally:
                evil.close()


def test_unsolicited_replay_data_is_counted_and_logs_are_limited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "zeromesh.pubsub")
    with _node(tmp_path, "victim", unique("rd")) as victim, \
            Subscriber(victim, unique("s")) as sub:
        evil = RawPeer(victim)
        try:
            evil.hello()
            junk = [(frames.CTRL_REPLAY_DATA, frames.ReplayData(
                uuid.uuid4().hex, i, "x", 0, [b"e"], 1, 0).to_body()) for i in range(500)]
            junk += [(frames.CTRL_REPLAY_DATA, {"v": 1, "sid": sub.sid, "events": 3})] * 500
            for i in range(0, len(junk), 100):
                evil.send(junk[i:i + 100])
            wait_until(lambda: sub._router.bad >= 500 and sub.stats().bad_replies >= 500, 5,
                       what="unsolicited replies counted")
            lines = sum(1 for r in caplog.records if r.name == "zeromesh.pubsub")
            assert lines <= 2 * 12, lines  # two kinds: 10 each, then one per 10 s
        finally:
            evil.close()


def _ack(stream: str, name: str, pos: int) -> dict[str, Any]:
    return frames.Ack(name, stream, pos).to_body()


def _ack_flood(victim: Node, peer: RawPeer, pub: Publisher, stream: str, n: int) -> list[str]:
    """n acks with unique names, while another thread reads stats() in a loop."""
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                pub.stats()
                victim.metrics.as_dict()
            except Exception as exc:  # the race the lock closes
                errors.append(repr(exc))
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    c0 = victim.stats().get("control_in", 0)
    try:
        for i in range(0, n, 200):
            peer.send([(frames.CTRL_ACK, _ack(stream, f"n{i + j}", i + j)) for j in range(200)])
            # Paced by the victim's progress, so the reader overlaps every burst.
            want = c0 + i + 200
            poll_until(lambda w=want: victim.stats().get("control_in", 0) >= w, 1)
        t0 = time.monotonic()
        ok = poll_until(lambda: pub.stats().acks_refused + len(pub.stats().positions) >= n
                        or errors, 60)
        print("took", time.monotonic() - t0, victim.stats().get("control_in"))
        if not ok:
            st = victim.stats()
            raise AssertionError(f"acks handled: {pub.stats().acks_refused} refused, "
                                 f"{len(pub.stats().positions)} positions; " + str({k: v for k, v in st.items() if isinstance(v, int) and v and ("rate" in k or "denied" in k or "control" in k or "bad" in k or "drop" in k)}))
    finally:
        stop.set()
        t.join(5)
    return errors


def test_forged_acks_bounded_and_stats_threadsafe_plaintext(tmp_path: Path) -> None:
    m = unique("ack")
    with _node(tmp_path, "victim", m) as victim, Publisher(victim, unique("s")) as pub:
        pub.publish_many(list(range(10)))
        peer = RawPeer(victim)
        try:
            peer.hello()
            base = _rss()
            errors = _ack_flood(victim, peer, pub, pub.stream, 8_000)  # 31x the bound
            assert errors == []
            s = pub.stats()
            assert len(s.positions) <= pubmod.ACK_POSITIONS_PER_PEER
            assert s.acks_refused >= 8_000 - pubmod.ACK_POSITIONS_PER_PEER
            lags = sum(len(v["samples"]) for k, v in victim.metrics.as_dict().items()
                       if "consumer_lag" in k)
            assert lags <= pubmod.ACK_POSITIONS_PER_PEER, lags
            assert _rss() - base < 32 * MiB
            # A known position still moves (real traffic keeps working).
            peer.send([(frames.CTRL_ACK, _ack(pub.stream, "n0", 7))])
            wait_until(lambda: pub.stats().positions.get("n0") == 7, 5, what="ack moved")
        finally:
            peer.close()


def test_forged_acks_curve_insider_only_its_stream(
        tmp_path: Path, keys: dict[str, Keypair]) -> None:
    m = unique("ackc")
    allowed, other = unique("s"), unique("t")
    perms = {keys["c"].public: (f"publish:{allowed}", f"subscribe:{allowed}",
                                f"replay:{allowed}")}
    with _node(tmp_path, "victim", m, _sec(tmp_path, "a", perms)) as victim, \
            Publisher(victim, allowed) as pub, Publisher(victim, other) as pub2:
        pub2.publish_many(list(range(10)))
        peer = RawPeer(victim, key=keys["c"])
        try:
            peer.hello()
            peer.send([(frames.CTRL_ACK, _ack(other, f"x{j}", 0)) for j in range(100)])
            wait_until(lambda: pub2.stats().acks_refused >= 100, 5, what="forbidden acks")
            assert pub2.stats().positions == {}
            errors = _ack_flood(victim, peer, pub, allowed, 5000)
            assert errors == []
            assert len(pub.stats().positions) <= pubmod.ACK_POSITIONS_PER_PEER
        finally:
            peer.close()


def test_replay_frames_round_trip_tok() -> None:
    rq = frames.decode_replay_request(msgpack.unpackb(msgpack.packb(
        _replay("s", 1, tok=42)), raw=False))
    assert rq.tok == 42
    rd = frames.ReplayData("a", 1, "s", 0, [], 0, 0, False, "busy", tok=5, retry_ms=500)
    back = frames.decode_replay_data(rd.to_body(), max_event_size=1 << 20)
    assert (back.error, back.tok, back.retry_ms) == ("busy", 5, 500)


def test_tracker_backs_off_when_a_reply_moves_nothing() -> None:
    """The loop behind ~2,200 requests a second: a head far ahead, replies with nothing."""
    t = StreamTracker(0, retry_s=2.0)
    now = 100.0
    ask = t.start(now).ask
    assert ask is not None
    t.on_heartbeat(1 << 62, now)
    step = t.on_replay(ask.req, 0, [], 1 << 62, 0, False, now)
    assert step.ask is None  # was: asked again at once, for ever
    assert t.on_tick(now + 0.01).ask is None
    again = t.on_tick(now + 0.05).ask
    assert again is not None
    # Each further empty reply doubles the wait, up to retry_s.
    waits = []
    for _ in range(8):
        t.on_replay(again.req, 0, [], 1 << 62, 0, False, now)
        w = 0.0
        while (again := t.on_tick(now + w).ask) is None:
            w += 0.01
        waits.append(round(w, 2))
        now += w
    assert waits == sorted(waits) and waits[-1] <= 2.0 and waits[0] >= 0.1, waits
    assert t.stats.replay_idle == 9
    # Progress resets it: events continue at once.
    step = t.on_replay(again.req, 0, [b"e0"], 1 << 62, 0, False, now)
    assert step.deliver == [(0, [b"e0"])] and step.ask is not None


def test_tracker_busy_and_deferred_requests() -> None:
    t = StreamTracker(0, retry_s=2.0)
    ask = t.start(10.0).ask
    assert ask is not None
    t.on_replay_busy(ask.req, 10.0, 0.5)
    assert t.on_tick(10.4).ask is None
    retry = t.on_tick(10.5).ask
    assert retry is not None and retry.start == 0 and t.stats.replay_busy == 1
    # Not sent (the subscriber's limit): kept, sent after the delay, not a retry.
    t.defer(10.5, 0.2)
    assert t.stats.replay_deferred == 1
    assert t.on_replay(retry.req, 0, [b"x"], 5, 0, False, 10.6).deliver == []  # never sent
    assert t.on_tick(10.6).ask is None
    sent = t.on_tick(10.7).ask
    assert sent is not None and t.stats.replay_requests == 3 - 1
