"""Bucket reconciliation (control 1.3) with real nodes: a view that differs by one id costs a
few entries to reconcile, not the whole view; nodes of control 1.2 in the same mesh get full
lists and pulls as before and converge with the others."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from mesh import control, gossip
from mesh.node import Node, PresenceConfig
from mesh.peers import PeerState
from tests.test_gossip_nodes import FAST, Procs, RawPeer, _ctl, _pump_until
from tests.test_gossip_nodes import mesh2 as mesh2  # the fixture (a, b and raw peers)
from tests.util import poll_until, unique, wait_until

#: heartbeat, evasive, gone: a gossip round (10 heartbeats) every 2 s
PRESENCE = [0.2, 1.2, 4.0]


def _node(root: Path, name: str, mesh: str, seed: str | None = None) -> Node:
    return Node(data_dir=root / name, name=name, mesh=mesh, mdns=False, interface="127.0.0.1",
                transports=("tcp",), presence=PresenceConfig(*PRESENCE),
                static_peers=(seed,) if seed else (), max_ids_per_source=1024)


def _delta(a: list[dict[str, int]], b: list[dict[str, int]], key: str) -> int:
    return sum(y.get(key, 0) - x.get(key, 0) for x, y in zip(a, b, strict=True))


def _entry_bytes(node: Node) -> int:
    """The wire size of the largest gossip entry this mesh holds (one node's entry)."""
    i = node.info()
    return len(msgpack.packb(control.gossip_to_wire(
        [(i.node_id, i.mesh, i.host, i.endpoints.get("control", ()), i.public_key)])[0]))


def test_one_id_of_difference_costs_a_few_entries_not_the_whole_view(tmp_path: Path) -> None:
    """21 nodes; a raw peer verified by the seed only (the others cannot reach it back: a
    persistent difference of one id, the worst case, answered again and again within the
    backoff). Every answered mismatch between the seed and another node is a bucket exchange
    of a few entries. On the old code (1.2) every answered mismatch sent the full list (20
    entries each way) and a pull: this fails on ``gossip_full_sent``."""
    mesh = unique("buckets")
    ctx = zmq.Context()
    with _node(tmp_path, "seed", mesh) as seed:
        p = Procs(tmp_path, seed, 2, PRESENCE)
        raw: RawPeer | None = None
        try:
            n = 21
            wait_until(lambda: len(seed.peers.list()) == n - 1
                       and all(s["peers"] == n - 1 for s in p.stats()), 60,
                       what=lambda: sorted(s["peers"] for s in p.stats()))
            # the join's answers settle: one more round everywhere
            s0 = p.stats()
            wait_until(lambda: all(b["gossip_digests_sent"] - a["gossip_digests_sent"] >= n - 1
                                   for a, b in zip(s0, p.stats(), strict=True)), 30)
            r = raw = RawPeer(ctx, seed, (1, 3), 0)
            # the seed verifies it (PONG) and tells the others (a delta): they dial it, and
            # it never answers them
            def dialled() -> bool:
                r.pump()
                heard = {h["info"]["node_id"] for h in r.kinds(control.HELLO)}
                return len(heard - {seed.id}) >= n - 1

            assert poll_until(dialled, 20, between=r.pump), "every node dialled the raw peer"
            c0, k0 = p.stats(), seed.stats()
            # two rounds of mismatches at every node (the seed's digest names the raw peer)
            assert poll_until(lambda: all(b["gossip_mismatches"] - a["gossip_mismatches"] >= 2
                                          for a, b in zip(c0, p.stats(), strict=True)),
                              30, between=r.pump), "the difference was seen"
            c1, k1 = p.stats(), seed.stats()
            assert seed.peers.state(r.id) is PeerState.JOINED  # the difference persisted
            assert all(s["peers"] == n - 1 for s in c1)  # nobody else has it (or lost one)
            before, after = [*c0, k0], [*c1, k1]
            # no full list anywhere: every answer was a bucket exchange
            assert _delta(before, after, "gossip_full_sent") == 0, [
                {k: y[k] - x.get(k, 0) for k in y if isinstance(y[k], int) and y[k] != x.get(k, 0)
                 and k.startswith("gossip")} for x, y in zip(before, after, strict=True)
                if y.get("gossip_full_sent", 0) != x.get("gossip_full_sent", 0)]
            assert _delta(before, after, "gossip_pulls_sent") == 0
            exchanges = _delta(before, after, "gossip_buckets_sent")
            assert exchanges >= n - 1  # each node asked the seed, or the seed asked it
            entries = _delta(before, after, "gossip_bucket_entries_sent")
            list_bytes = _delta(before, after, "gossip_list_bytes_sent")
            # an exchange is about 1.3 entries of the differing bucket each way (21 ids in 16
            # buckets) and the raw peer's; a full list each way would be 40 entries
            assert 1 <= entries <= 6 * exchanges, (entries, exchanges)
            assert list_bytes <= 6 * exchanges * (_entry_bytes(seed) + 8), (
                list_bytes, exchanges)
        finally:
            if raw is not None:
                raw.close()
            p.close()
    ctx.term()


class _Lossy:
    """Drops every gossip list a node sends while ``on`` (a lost delta, as on a bad link)."""

    def __init__(self, node: Node) -> None:
        self.on = False
        ch = node._channel
        send = ch._send_gossip

        def lossy(link: Any, entries: Any, what: str) -> bool:
            if self.on:
                return False
            return send(link, entries, what)

        ch._send_gossip = lossy  # type: ignore[method-assign]


def _all_see_all(nodes: list[Node], p: Procs, n: int) -> Callable[[], bool]:
    def check() -> bool:
        return (all(len([r for r in nd.peers.records() if r.state is PeerState.JOINED])
                    == n - 1 for nd in nodes)
                and all(s["peers"] == n - 1 for s in p.stats()))
    return check


def test_nodes_of_control_1_2_converge_with_1_3_nodes_after_a_lost_delta(
        tmp_path: Path) -> None:
    """A seed and 5 nodes of 1.3, 5 nodes of 1.2 (they announce rev [1, 2] and answer
    mismatches with full lists). A node joins through the seed while every list the seed sends
    is lost: nobody hears of it, it hears of nobody; the next rounds' digests find it. The 1.3
    nodes reconcile by buckets among themselves, the 1.2 nodes get full lists and pulls (no
    bucket field ever reaches them), and all 12 see all. On the old code there are no bucket
    exchanges (this fails on ``gossip_buckets_sent``)."""
    mesh = unique("mixed")
    with _node(tmp_path, "seed", mesh) as seed:
        lossy = _Lossy(seed)
        p = Procs(tmp_path, seed, 2, PRESENCE, count=5, extra={0: {"rev": [1, 2]}})
        late: Node | None = None
        try:
            wait_until(_all_see_all([seed], p, 11), 60,
                       what=lambda: sorted(s["peers"] for s in p.stats()))
            c0, k0 = p.stats(), seed.stats()
            lossy.on = True
            late = _node(tmp_path, "late", mesh, _ctl(seed))
            # the seed verified it and looked at its view (its lists are lost meanwhile)
            assert late is not None
            late_id = late.id
            wait_until(lambda: late_id in seed._channel._view_ids, 10)
            assert all(s["peers"] == 10 for s in p.stats())  # nobody else knows it
            lossy.on = False
            wait_until(_all_see_all([seed, late], p, 12), 60,
                       what=lambda: sorted(s["peers"] for s in p.stats()))
            c1, k1 = p.stats(), seed.stats()
            old, new = c0[:5], c0[5:]
            old1, new1 = c1[:5], c1[5:]
            # no bucket field reached a 1.2 node: they never asked, so nobody wanted from them
            assert _delta(old, old1, "gossip_buckets_sent") == 0
            assert _delta(old, old1, "gossip_wants_sent") == 0
            # the 1.2 nodes and the seed exchanged full lists (a pull asked for one)
            assert (_delta(old, old1, "gossip_pulls_sent") + _delta(old, old1, "gossip_pulls_in")
                    + k1.get("gossip_pulls_sent", 0) - k0.get("gossip_pulls_sent", 0)) >= 1
            # the 1.3 nodes used buckets (with the seed, the late node or each other)
            assert (_delta(new, new1, "gossip_buckets_sent")
                    + k1.get("gossip_buckets_sent", 0) - k0.get("gossip_buckets_sent", 0)
                    + late.stats().get("gossip_buckets_sent", 0)) >= 1
        finally:
            if late is not None:
                late.close()
            p.close()


def test_a_1_3_peer_gets_bucket_hashes_and_bucket_lists_on_the_wire(
        mesh2: tuple[Node, Node, Callable[..., RawPeer]]) -> None:
    """A raw 1.3 peer shows a wrong digest: the node answers with its bucket hashes (no full
    list); the peer's hashes of another view get the entries of the differing buckets and a
    want; the peer's want gets the entries of the wanted buckets; bad bucket fields are
    counted and the peer stays. On the old code a wrong digest gets the full list and a pull
    (and ``s``/``b``/``w`` are ignored): this fails at the first answer."""
    a, b, raw = mesh2
    r = raw((1, 3))
    _pump_until([r], lambda: len(r.kinds("digest")) >= 1, 5, "r gets a's digest")
    lists0 = len(r.kinds(control.GOSSIP))
    r.send("digest", {"d": b"\x01" * 8, "n": 3, "pull": False})

    def asks() -> list[Any]:
        return [x for x in r.kinds("digest") if "b" in x]

    _pump_until([r], lambda: asks() or len(r.kinds(control.GOSSIP)) > lists0, 5,
                "a answered the mismatch")
    assert len(r.kinds(control.GOSSIP)) == lists0  # no list: bucket hashes instead
    ask = asks()[0]
    ids = [a.id, b.id, r.id]  # a's view (b and r, verified) and a itself
    k = gossip.bucket_count(len(ids))
    assert ask["pull"] is True and len(ask["s"]) == 8 and len(ask["b"]) == 4 * k
    assert ask["b"] == gossip.buckets(ids, ask["s"], k) and ask["d"] == gossip.digest(ids)
    # our hashes of a view without b (another salt: ours): a sends b's entry (and any of
    # those buckets) and wants the same buckets
    salt = b"\x07" * 8
    mine = [a.id, r.id]
    diff = gossip.differing(gossip.buckets(ids, salt, k), gossip.buckets(mine, salt, k))
    assert diff == [gossip.bucket_of(b.id, salt, k)]
    r.send("digest", {"d": gossip.digest(mine), "n": 2, "pull": True, "s": salt,
                      "b": gossip.buckets(mine, salt, k)})

    def wants() -> list[Any]:
        return [x for x in r.kinds("digest") if "w" in x]

    _pump_until([r], lambda: wants(), 5, "a wants the differing buckets")
    w = wants()[0]
    assert w["s"] == salt and w["k"] == k and w["w"] == diff
    got = r.kinds(control.GOSSIP)[lists0:]
    assert [[e[0] for e in g] for g in got] == [
        [nid for nid in gossip.in_buckets([b.id], salt, k, diff)]]  # b's entry, never r's
    # a want (past a's 3-heartbeat limit on lists to r: owed, then sent)
    every = list(range(k))
    r.send("digest", {"d": gossip.digest(mine), "n": 2, "pull": True, "s": salt, "k": k,
                      "w": every})
    _pump_until([r], lambda: len(r.kinds(control.GOSSIP)) >= lists0 + 2, 5, "a answers")
    assert sorted(e[0] for e in r.kinds(control.GOSSIP)[lists0 + 1]) == [b.id]
    assert len(wants()) == 1  # a want is answered with entries only: nothing loops
    assert len(asks()) == 1 and len(r.kinds(control.GOSSIP)) == lists0 + 2  # no full list
    # (b cannot reach r either: a and b differ too, and reconcile by buckets as well)
    st = a.stats()
    assert st["gossip_buckets_sent"] >= 1 and st["gossip_buckets_in"] >= 1
    assert st["gossip_wants_sent"] >= 1 and st["gossip_wants_in"] >= 1
    assert st["gossip_bucket_lists_sent"] >= 2 and st["gossip_bucket_entries_sent"] >= 2
    # bad bucket fields: malformed, the peer stays
    m0 = st.get("malformed", 0)
    for bad in ({"d": b"x" * 8, "b": b"h" * 4}, {"d": b"x" * 8, "s": salt, "b": b"h" * 5},
                {"d": b"x" * 8, "s": salt, "k": 2, "w": [2]},
                {"d": b"x" * 8, "s": salt, "b": b"h" * 4, "k": 1, "w": [0]}):
        r.send("digest", bad)
    _pump_until([r], lambda: a.stats().get("malformed", 0) >= m0 + 4, 5, "malformed counted")
    assert a.peers.state(r.id) is PeerState.JOINED


def test_a_flood_of_wrong_digests_gets_bounded_bucket_hashes(
        mesh2: tuple[Node, Node, Callable[..., RawPeer]]) -> None:
    """300 changing wrong digests from a 1.3 peer: at most one set of bucket hashes per 3
    heartbeats, the rest counted. On the old code each was answered with a full list (rate
    limited) and no hashes: this fails on ``gossip_buckets_sent``."""
    a, _b, raw = mesh2
    r = raw((1, 3))
    _pump_until([r], lambda: len(r.kinds("digest")) >= 1, 5, "r gets a's digest")
    t0 = time.monotonic()
    for i in range(300):
        r.send("digest", {"d": i.to_bytes(8, "big"), "n": 3, "pull": False})
    _pump_until([r], lambda: a.stats().get("gossip_digests_in", 0) >= 300, 5, "a read them")
    elapsed = time.monotonic() - t0
    st = a.stats()
    assert 1 <= st.get("gossip_buckets_sent", 0) <= 2 + elapsed / (3 * FAST.heartbeat_s)
    assert st["gossip_asks_limited"] >= 250
    assert st.get("gossip_full_sent", 0) <= 1  # r's join only



def test_a_list_owed_to_a_peer_is_dropped_once_its_digest_agrees(
        mesh2: tuple[Node, Node, Callable[..., RawPeer]]) -> None:
    """A raw peer asks for a's full list twice in a row: the first is answered, the second
    held back by the 3-heartbeat limit (owed); then it shows a digest equal to a's: the
    views agree, the owed list is dropped. The old code forgot the peer's digest on
    agreement and sent the owed list at the next allowed tick: this fails there (2 lists)."""
    a, b, raw = mesh2
    r = raw((1, 2))

    def rounds() -> int:
        return sum(1 for x in r.kinds("digest") if not x.get("pull"))

    _pump_until([r], lambda: any(x.get("n") == 3 for x in r.kinds("digest")), 5,
                "a verified r (its digest covers a, b and r)")
    n0 = rounds()  # two rounds more: r's join list (a newcomer's) is 20 heartbeats old
    _pump_until([r], lambda: rounds() >= n0 + 2, 10, "two rounds")
    ours = gossip.digest([a.id, b.id, r.id])
    assert r.kinds("digest")[-1]["d"] == ours
    lists = len(r.kinds(control.GOSSIP))
    r.send("digest", {"d": b"\x01" * 8, "n": 1, "pull": True})
    r.send("digest", {"d": b"\x02" * 8, "n": 1, "pull": True})
    r.send("digest", {"d": ours, "n": 3, "pull": False})  # r's view is a's now
    n1 = rounds()
    # two of a's rounds later (20 heartbeats: far past the 3-heartbeat limit)
    _pump_until([r], lambda: rounds() >= n1 + 2, 10, "two more rounds")
    got = r.kinds(control.GOSSIP)[lists:]
    assert len(got) == 1 and any(e[0] == b.id for e in got[0])  # the first pull's answer
    assert a.stats()["gossip_push_limited"] >= 1  # the second was held, then dropped
