"""Gossip with real nodes: 31 nodes in 3 processes see all through one seed and their idle
gossip grows linearly with N; a raw pyzmq peer checks the revision negotiation (an old peer
gets full lists, never a digest) and that a digest / pull flood gets bounded full lists."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh import control
from mesh.control import Hello
from mesh.node import Node, PresenceConfig
from mesh.peers import PeerInfo, PeerState
from tests.gossip_child import CODE
from tests.util import poll_until, python_child, unique, wait_until

# --- many nodes -----------------------------------------------------------------------------

SCALE = [0.25, 1.5, 4.0]  # heartbeat, evasive, gone: a gossip round every 2.5 s


class Procs:
    """Child processes of 10 nodes each, joined through ``seed``."""

    def __init__(self, root: Path, seed: Node, procs: int, presence: list[float] = SCALE,
                 count: int = 10, extra: dict[int, dict[str, Any]] | None = None) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        for k in range(procs):
            cfg = {"count": count, "mesh": seed.mesh, "seed": _ctl(seed),
                   "root": str(root / f"p{k}"), "presence": presence,
                   **(extra or {}).get(k, {})}
            self.children.append(python_child(CODE, json.dumps(cfg), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE))
        for c in self.children:
            assert "ready" in self._line(c, 30)

    @staticmethod
    def _line(c: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        assert c.stdout is not None
        r, _, _ = select.select([c.stdout], [], [], timeout)
        assert r, "child did not answer"
        out: dict[str, Any] = json.loads(c.stdout.readline())
        return out

    def stats(self) -> list[dict[str, int]]:
        for c in self.children:
            assert c.stdin is not None
            c.stdin.write(b"stats\n")
            c.stdin.flush()
        return [s for c in self.children for s in self._line(c, 10)["stats"]]

    def close(self) -> None:
        for c in self.children:
            try:
                assert c.stdin is not None
                c.stdin.write(b"quit\n")
                c.stdin.close()
            except OSError:
                pass
        for c in self.children:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(5)


def _rounds(s: dict[str, int]) -> int:
    # messages of the periodic round: a digest per peer, or (before 1.2) a full list per peer
    return s["gossip_sent"] + s["gossip_digests_sent"]


def _idle_bytes_per_node_s(root: Path, procs: int) -> float:
    """Join 10 * procs nodes and a seed; control bytes out per node per second over two
    gossip rounds once all see all."""
    with Node(data_dir=root / "seed", name="seed", mesh=unique("gossip"), mdns=False,
              interface="127.0.0.1", transports=("tcp",), presence=PresenceConfig(*SCALE),
              max_ids_per_source=1024) as seed:
        p = Procs(root, seed, procs)
        try:
            n = 10 * procs + 1
            wait_until(lambda: len(seed.peers.list()) == n - 1
                       and all(s["peers"] == n - 1 for s in p.stats()), 60,
                       what=lambda: sorted(s["peers"] for s in p.stats()))
            # one round after all see all (the join's answers), then two rounds measured
            s0 = p.stats()
            wait_until(lambda: all(_rounds(b) - _rounds(a) >= n - 1
                                   for a, b in zip(s0, p.stats(), strict=True)), 30)
            s0, t0 = p.stats(), time.monotonic()
            def measured() -> list[dict[str, int]] | None:
                s = p.stats()
                done = all(_rounds(y) - _rounds(x) >= 2 * (n - 1)
                           for x, y in zip(s0, s, strict=True))
                return s if done else None

            s1 = wait_until(measured, 30)
            dt = time.monotonic() - t0
            assert all(s["peers"] == n - 1 for s in s1)  # nobody lost on the way
            return sum(b["control_bytes_out"] - a["control_bytes_out"]
                       for a, b in zip(s0, s1, strict=True)) / len(s1) / dt
        finally:
            p.close()


def test_31_nodes_see_all_through_one_seed_and_idle_gossip_grows_linearly(
        tmp_path: Path) -> None:
    """Before digests, each round sent N-1 entries to N-1 peers: per node bytes grew ~9x from
    11 to 31 nodes (measured on the old code: ratio 8-9). Keepalives grow 3x (30 / 10 peers);
    digests too. A ratio under 5 leaves room for noise and the join's last answers."""
    small = _idle_bytes_per_node_s(tmp_path / "small", 1)
    large = _idle_bytes_per_node_s(tmp_path / "large", 3)
    assert large / small < 5, (small, large)


# --- a raw peer -------------------------------------------------------------------------------

FAST = PresenceConfig(heartbeat_s=0.1, evasive_s=0.5, gone_s=2.0)


def _ctl(node: Node) -> str:
    return next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))


class RawPeer:
    """A pyzmq stand-in for a node: a DEALER to the node, a ROUTER it connects back to; it
    answers PING with PONG and records what it gets."""

    def __init__(self, ctx: zmq.Context[Any], node: Node, rev: tuple[int, int] | None,
                 idx: int) -> None:
        self.id = f"{0xD16E0000 + idx:032x}"
        self.inbox = ctx.socket(zmq.ROUTER)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind("tcp://127.0.0.1:*")
        ep = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.out = ctx.socket(zmq.DEALER)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.setsockopt(zmq.SNDHWM, 100_000)
        self.out.setsockopt(zmq.ROUTING_ID, self.id.encode() + os.urandom(8))
        self.out.connect(_ctl(node))
        self.got: list[tuple[str, Any]] = []
        info = PeerInfo(node_id=self.id, name="raw", mesh=node.mesh, endpoints={"control": (ep,)})
        # the wire map by hand (``rev`` present or not), so that this runs on older builds too
        hello = control.hello_to_wire(Hello(info))
        hello.pop("rev", None)
        if rev is not None:
            hello["rev"] = list(rev)
        self.send(control.HELLO, hello)

    def send(self, kind: str, body: Any) -> None:
        self.out.send_multipart(control.encode_frames([(kind, control.encode_body(body,
                                                                                  1 << 20))]))

    def pump(self) -> None:
        while True:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for m in control.decode_frames(frames[1:]):
                self.got.append((m.kind, m.body))
                if m.kind == control.PING:
                    self.send(control.PONG, m.body)

    def kinds(self, kind: str) -> list[Any]:
        return [b for k, b in self.got if k == kind]

    def close(self) -> None:
        self.inbox.close()
        self.out.close()


@pytest.fixture
def mesh2(tmp_path: Path) -> Iterator[tuple[Node, Node, Callable[..., RawPeer]]]:
    mesh = unique("gossip")
    ctx = zmq.Context()
    raws: list[RawPeer] = []
    a = Node(data_dir=tmp_path / "a", name="a", mesh=mesh, mdns=False, interface="127.0.0.1",
             transports=("tcp",), presence=FAST)
    b = Node(data_dir=tmp_path / "b", name="b", mesh=mesh, mdns=False, interface="127.0.0.1",
             transports=("tcp",), presence=FAST, static_peers=(_ctl(a),))

    def raw(rev: tuple[int, int] | None) -> RawPeer:
        r = RawPeer(ctx, a, rev, len(raws))
        raws.append(r)
        return r

    try:
        wait_until(lambda: a.peers.state(b.id) is PeerState.JOINED
                   and b.peers.state(a.id) is PeerState.JOINED, 5)
        yield a, b, raw
    finally:
        for r in raws:
            r.close()
        b.close()
        a.close()
        ctx.term()


def _pump_until(raws: list[RawPeer], cond: Callable[[], object], timeout: float,
                what: str) -> None:
    def between() -> None:
        for r in raws:
            r.pump()
    assert poll_until(lambda: (between(), cond())[1], timeout, between=between), what


def _names(body: Any, node_id: str) -> bool:
    return any(e[0] == node_id for e in body)


# Written out rather than taken from mesh.control, so that these tests also run against a
# build before 1.2 (where they fail: that is how they were checked).
DIGEST = "digest"
REV = (1, 2)


def _digest(d: bytes, pull: bool = False) -> dict[str, Any]:
    return {"d": d, "n": 3, "pull": pull}


def _pulls(r: RawPeer) -> int:
    return sum(1 for x in r.kinds(DIGEST) if x.get("pull"))


def _rounds_at(r: RawPeer) -> int:
    return sum(1 for x in r.kinds(DIGEST) if not x.get("pull"))


def test_old_peers_get_full_lists_and_never_a_digest_new_peers_get_digests(
        mesh2: tuple[Node, Node, Callable[..., RawPeer]]) -> None:
    """On the old code the new peer never gets a digest (every round is a full list)."""
    _a, b, raw = mesh2
    old, new = raw(None), raw(REV)
    _pump_until([old, new], lambda: len([g for g in old.kinds(control.GOSSIP)
                                         if _names(g, b.id)]) >= 2
                and len(new.kinds(DIGEST)) >= 2, 10,
                "two rounds: full lists naming b to the old peer, digests to the new one")
    assert old.kinds(DIGEST) == []  # a 1.1 node would count it unhandled_kind
    d = new.kinds(DIGEST)[-1]
    assert not d["pull"] and d["n"] == 4  # a, b and the two raw peers (verified by PONGs)
    # the new peer came to a on its own: a full list at its join (and deltas as b and the
    # old peer were verified); since then only digests: two more rounds bring no list
    n = len(new.kinds(control.GOSSIP))
    rounds = len(new.kinds(DIGEST))
    _pump_until([old, new], lambda: len(new.kinds(DIGEST)) >= rounds + 2, 10,
                "two more rounds")
    assert len(new.kinds(control.GOSSIP)) == n
    assert len([g for g in old.kinds(control.GOSSIP) if _names(g, b.id)]) >= 4


def test_a_digest_and_pull_flood_gets_bounded_full_lists(
        mesh2: tuple[Node, Node, Callable[..., RawPeer]]) -> None:
    """On the old code ``digest`` is an unhandled kind: no full list, no pull, no counters."""
    a, b, raw = mesh2
    r = raw(REV)
    _pump_until([r], lambda: len(r.kinds(DIGEST)) >= 1, 5, "r gets a's digest")
    base = len(r.kinds(control.GOSSIP))
    st0 = a.stats()
    # a persistent mismatch (the same wrong digest 40 times): answered 6 times, backed off 34
    wrong = _digest(b"\x01" * 8)
    for _ in range(40):
        r.send(DIGEST, wrong)
    _pump_until([r], lambda: a.stats().get("gossip_mismatches", 0)
                - st0.get("gossip_mismatches", 0) >= 40, 5, "a read the 40 digests")
    st = a.stats()
    assert st["gossip_backoff"] - st0.get("gossip_backoff", 0) == 34
    # answered: a full list naming b and a pull request
    _pump_until([r], lambda: any(_names(g, b.id) for g in r.kinds(control.GOSSIP)[base:])
                and _pulls(r) >= 1, 5,
                "a answered the mismatch with its list and a pull")
    # a flood of changing digests and pulls: at most one full list per 3 heartbeats
    t0 = time.monotonic()
    n0 = len(r.kinds(control.GOSSIP))
    for i in range(300):
        r.send(DIGEST, _digest(i.to_bytes(8, "big"), pull=i % 2 == 1))
    _pump_until([r], lambda: a.stats().get("gossip_digests_in", 0)
                - st0.get("gossip_digests_in", 0) >= 340, 5, "a read the flood")
    # what is owed goes once the limit allows: two of a's rounds later (10 heartbeats each,
    # past the 3-heartbeat limit) everything owed has gone; count
    rounds0 = _rounds_at(r)
    _pump_until([r], lambda: _rounds_at(r) >= rounds0 + 2, 5, "two more rounds")
    elapsed = time.monotonic() - t0
    sent = len(r.kinds(control.GOSSIP)) - n0
    assert 1 <= sent <= 2 + elapsed / (3 * FAST.heartbeat_s), (sent, elapsed)
    assert a.stats()["gossip_push_limited"] >= 100
    # a malformed digest is counted, the peer stays
    m0 = a.stats().get("malformed", 0)
    r.send(DIGEST, {"d": b"short"})
    _pump_until([r], lambda: a.stats().get("malformed", 0) > m0, 5, "malformed counted")
    assert a.peers.state(r.id) is PeerState.JOINED


def test_gossip_counters_are_metrics_families_over_http(
        mesh2: tuple[Node, Node, Callable[..., RawPeer]]) -> None:
    """Old code kept the gossip counters in ``node.stats()`` only: a scrape of /metrics had
    no ``gossip_*`` family to alert on (digests, lists, pulls, mismatches, caps hit); 1.2
    had no family of the bucket path (control 1.3)."""
    import urllib.request

    from mesh.metrics import parse_prometheus, serve_prometheus

    a, b, raw = mesh2
    r = raw(REV)
    _pump_until([r], lambda: len(r.kinds(DIGEST)) >= 1, 5, "r gets a's digest")
    # a list (read first: one connection keeps the order), then the digests
    ep = r.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
    r.send(control.GOSSIP, control.gossip_to_wire([(r.id, a.mesh, "127.0.0.1", (ep,), None)]))
    wrong = _digest(b"\x01" * 8)
    for _ in range(40):  # a persistent mismatch: answered 6 times, backed off 34
        r.send(DIGEST, wrong)
    for i in range(60):  # changing digests and pulls: the per-peer cap holds lists back
        r.send(DIGEST, _digest(i.to_bytes(8, "big"), pull=i % 2 == 1))
    _pump_until([r], lambda: a.stats().get("gossip_digests_in", 0) >= 100, 5, "a read them")
    server, port = serve_prometheus(a)
    try:
        before = a.stats()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        after = a.stats()
    finally:
        server.close()
    samples = parse_prometheus(text)

    def value(name: str, **labels: str) -> float:
        (v,) = [v for lab, v in samples[name] if lab == labels]
        return v

    for family, key, labels in (
            ("gossip_digests_sent_total", "gossip_digests_sent", {}),
            ("gossip_digests_received_total", "gossip_digests_in", {}),
            ("gossip_lists_sent_total", "gossip_full_sent", {"kind": "full"}),
            ("gossip_lists_sent_total", "gossip_deltas_sent", {"kind": "delta"}),
            ("gossip_lists_received_total", "gossip_in", {}),
            ("gossip_pulls_sent_total", "gossip_pulls_sent", {}),
            ("gossip_pulls_received_total", "gossip_pulls_in", {}),
            ("gossip_mismatches_total", "gossip_mismatches", {}),
            ("gossip_mismatches_backed_off_total", "gossip_backoff", {}),
            ("gossip_lists_held_total", "gossip_push_limited", {}),
            ("gossip_dials_total", "gossip_dials", {})):
        assert f"# TYPE {family} counter" in text, family
        v = value(family, **labels)
        assert before.get(key, 0) <= v <= after.get(key, 0), (family, before.get(key), v)
    for family in ("gossip_newcomer_lists_sent_total", "gossip_buckets_sent_total",
                   "gossip_buckets_received_total", "gossip_wants_sent_total",
                   "gossip_wants_received_total", "gossip_bucket_entries_sent_total",
                   "gossip_bucket_fallbacks_total", "gossip_asks_limited_total"):
        assert f"# TYPE {family} counter" in text, family  # control 1.3 (buckets)
    assert before.get("gossip_bucket_lists_sent", 0) <= value(
        "gossip_lists_sent_total", kind="bucket") <= after.get("gossip_bucket_lists_sent", 0)
    assert value("gossip_digests_received_total") >= 100
    assert value("gossip_pulls_received_total") >= 30
    assert value("gossip_mismatches_total") >= 40
    assert value("gossip_mismatches_backed_off_total") >= 34
    assert value("gossip_pulls_sent_total") >= 1  # the answered mismatches asked for r's list
    assert value("gossip_lists_sent_total", kind="full") >= 2  # r's join, r's mismatch
    assert value("gossip_lists_held_total") >= 1
    assert value("gossip_lists_received_total") >= 1
    assert value("gossip_digests_sent_total") >= 1
    # r joined after b: b hears of r from a in a delta list
    assert value("gossip_lists_sent_total", kind="delta") >= 1
    wait_until(lambda: b.stats().get("gossip_in", 0) >= 1, 5, what="b read a's delta")
