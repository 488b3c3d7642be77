"""A hostile admitted peer under CURVE: its key is allowed one stream (``a``: publish,
subscribe, replay, replicate). Whatever it puts in holdings / fetch / replicated bodies
about other streams or origins is not believed, and what it can make a store do is held
to per-peer budgets (real nodes, CURVE sockets, allowlist and permission rules)."""

from __future__ import annotations

from pathlib import Path

from mesh.envelope import Event, encode
from mesh.log import LogConfig
from mesh.node import Node
from patterns.pubsub import frames
from patterns.pubsub.holdings import board_for
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import HOLDINGS_PEER_PAGES, Store
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import CurveHub, unique, wait_until

NAMES = ("hub", "pub", "store", "evil")


def test_a_peer_allowed_one_stream_cannot_make_a_store_or_an_origin_believe_more(
        tmp_path: Path) -> None:
    cm = CurveHub(tmp_path, NAMES)
    keys = cm.keys
    base = unique("h").replace("-", "")
    a, b = f"{base}.a", f"{base}.b"
    every = ["publish:*", "subscribe:*", "replay:*"]
    perms = {keys["hub"].public: every, keys["pub"].public: every,
             keys["store"].public: [*every, "replicate:*"],
             keys["evil"].public: [f"publish:{a}", f"subscribe:{a}", f"replay:{a}",
                                   f"replicate:{a}"]}

    def node(name: str, hub_ep: str | None) -> Node:
        return cm.node(name, perms, hub_ep)

    try:
        hub = node("hub", None)
        ep = hub.info().endpoints["control"][0]
        sn = node("store", ep)
        store = Store(sn, topics=(f"{base}.",), log_config=LogConfig())
        pn = node("pub", ep)
        wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10)
        pa = Publisher(pn, a, replicas=1, heartbeat_s=0.1, resume_from_stores=0)
        pb = Publisher(pn, b, replicas=1, heartbeat_s=0.1, resume_from_stores=0)
        pa.publish_many(list(range(10)))
        pb.publish_many(list(range(10)))
        evil = node("evil", ep)
        got: list[tuple[str, object]] = []
        evil.handle(frames.CTRL_HOLDINGS, lambda peer, body: got.append(("h", body)))
        evil.handle(frames.CTRL_REPLAY_DATA, lambda peer, body: got.append(("d", body)))
        wait_until(lambda: evil.who_offers("service", name=frames.STORE_SERVICE), 10)

        # 1. Holdings: it sees only the stream it may replay, however it asks, and no more
        #    than its budget of pages a second.
        for i in range(3 * HOLDINGS_PEER_PAGES):
            evil.send(sn.id, frames.CTRL_HOLDINGS_REQ, frames.encode_holdings_req("", i))
        wait_until(lambda: store.stats().holdings_answers + store.stats().holdings_refused
                   >= 3 * HOLDINGS_PEER_PAGES, 10, what=lambda: store.stats())
        assert store.stats().holdings_answers <= 2 * HOLDINGS_PEER_PAGES
        wait_until(lambda: len([g for g in got if g[0] == "h"])
                   >= store.stats().holdings_answers, 10)
        seen = {h.stream for _k, body in got if _k == "h"
                for h in frames.decode_holdings(body)[1]}
        assert seen == {a}

        # 2. Fetches: another stream is forbidden; absurd numbers get a bounded answer;
        #    a made-up origin is an unknown stream.
        def fetch(stream: str, origin: str, start: int, req: int) -> dict[str, object]:
            n = len(got)
            rq = frames.ReplayRequest("evil", req, stream, start, None, None, 1 << 40,
                                      1 << 62, origin=origin)
            evil.send(sn.id, frames.CTRL_FETCH, rq.to_body())
            wait_until(lambda: len(got) > n and got[-1][0] == "d", 10,
                       what=lambda: store.stats())
            body = got[-1][1]
            assert isinstance(body, dict)
            return body

        assert fetch(b, pn.id, 0, 1)["error"] == "forbidden"
        far = fetch(a, pn.id, 1 << 62, 2)
        assert far["error"] is None and far["events"] == [] and far["head"] == 10
        whole = fetch(a, pn.id, 0, 3)
        assert len(whole["events"]) == 10  # type: ignore[arg-type]
        assert fetch(a, "f" * 32, 0, 4)["error"] == "unknown_stream"

        # 3. Acks to the origin: for another stream refused; for its own stream never
        #    beyond what the origin published, whatever seq it claims.
        refused = pa._hub.replicated_refused
        evil.send(pn.id, frames.CTRL_REPLICATED,
                  frames.Replicated(b, pb.stats().epoch, 1 << 62).to_body())
        evil.send(pn.id, frames.CTRL_REPLICATED,
                  frames.Replicated(a, pa.stats().epoch, 1 << 62).to_body())
        wait_until(lambda: pa._hub.replicated_refused > refused
                   and evil.id in pa.stats().replicated, 10, what=lambda: pa.stats())
        assert evil.id not in pb.stats().replicated
        assert pa.stats().replicated[evil.id] == 10  # capped at the origin's head

        # 4. Holdings it was not asked for are not believed by a subscriber's board.
        board = board_for(pn)
        evil.send(pn.id, frames.CTRL_HOLDINGS, frames.encode_holdings(
            1, [frames.Holding(pn.id, b, 0, 1 << 62, 1)], False))
        wait_until(lambda: board.unasked >= 1, 10)
        assert (pn.id, b) not in board.rows
        # The store still holds exactly what the origin published.
        assert [h.head for h in sorted(store.holdings(), key=lambda h: h.stream)] == [10, 10]

        # 5. A fetch answer naming another stream's origin: a subscriber reading both streams
        #    (whose id the peer learns from its fetches of the stream it may serve) believes
        #    it only from a peer allowed to replicate that stream.
        sub = Subscriber(hub, f"{base}.", start=Start.beginning())
        seen_data: list[object] = []
        wait_until(lambda: seen_data.extend(e.data for e in sub.recv_batch(timeout=0.05))
                   or len(seen_data) >= 20, 20, what=lambda: sub.stats())
        assert sorted(seen_data, key=repr) == sorted([*range(10), *range(10)], key=repr)
        bad = sub.stats().bad_replies
        forged = [encode(Event(type="event", source=pn.id, stream=b, seq=10 + i,
                               data="forged")) for i in range(3)]
        answer = frames.ReplayData(sub.sid, 1, b, 10, forged, 13, 0, False, None,
                                   epoch=pb.stats().epoch, origin=pn.id)
        evil.send(hub.id, frames.CTRL_REPLAY_DATA, answer.to_body())
        late: list[object] = []
        wait_until(lambda: late.extend(e.data for e in sub.recv_batch(timeout=0.05))
                   or sub.stats().bad_replies > bad or late, 10, what=lambda: sub.stats())
        assert late == []
        assert sub.stats().bad_replies == bad + 1  # refused as from no store of that stream
        sub.close()
        pa.close()
        pb.close()
    finally:
        cm.close()
