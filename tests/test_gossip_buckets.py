"""Bucket reconciliation (control 1.3) with real nodes: a view that differs by one id costs a
few entries to reconcile, not the whole view; nodes of control 1.2 in the same mesh get full
lists and pulls as before and converge with the others."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from mesh import control
from mesh.node import Node, PresenceConfig
from mesh.peers import PeerState
from tests.test_gossip_nodes import Procs, RawPeer, _ctl
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
