"""Replicated streams in one process (real nodes, sockets and files): a store serves an
origin that is gone, never forges (a tampering store is caught by a verifying subscriber),
``Publisher(replicas=k)`` waits or raises a typed error, and the replica map (runs, epochs)
survives reopening, holes and rewinds. Real child processes: tests/test_store_procs.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh.envelope import Event, decode, encode
from mesh.errors import CodecError, ConfigError, ProtocolError, ReplicationTimeout
from mesh.log import LogConfig
from mesh.node import Node, PresenceConfig
from mesh.security.signing import EventSigner, EventVerifier
from patterns.pubsub import frames
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import Store, _Replica
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import unique, wait_until

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)
ORIGIN = "8d395d25ecfe4dd581e3e71a9c112cde"


class Mesh:
    """A hub node and helpers to add nodes dialling it (fast presence)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = unique("st")
        self.nodes: list[Node] = []
        self.hub = self.add("hub", static=False)

    def add(self, name: str, *, static: bool = True) -> Node:
        peers = (self.hub.info().endpoints["control"][0],) if static else ()
        nd = Node(data_dir=self.root / name, name=name, mesh=self.name, mdns=False,
                  interface="127.0.0.1", static_peers=peers, presence=PRESENCE)
        self.nodes.append(nd)
        return nd

    def close(self) -> None:
        for nd in reversed(self.nodes):
            nd.close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.close()


def _tamper(env: bytes) -> bytes:
    ev = decode(env)
    return encode(ev.replace(data=b"forged"))  # the signature (extras) is kept as it was


def _serve_gone_origin(mesh: Mesh, tamper: bool) -> tuple[Subscriber, int]:
    """A signed origin publishes 20 events with replicas=1 and leaves; a verifying
    subscriber started afterwards can only read them from the store."""
    signer = EventSigner(Ed25519PrivateKey.generate(), name="origin")
    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    Store(sn, topics=(stream,), tamper=_tamper if tamper else None)
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, sign=signer, replicas=1, heartbeat_s=0.1) as pub:
        for i in range(20):
            pub.publish(i)
    pn.close()
    wait_until(lambda: not mesh.hub.who_offers("stream", name=stream), 10, what="origin gone")
    cn = mesh.add("sub")
    sub = Subscriber(cn, stream, start=Start.beginning(),
                     verify=EventVerifier({"origin": signer.public_key}))
    return sub, 20


def test_a_verifying_subscriber_reads_a_signed_stream_from_the_store(mesh: Mesh) -> None:
    sub, n = _serve_gone_origin(mesh, tamper=False)
    got: list[Event] = []
    wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= n, 20,
               what=lambda: (len(got), sub.stats()))
    assert [e.data for e in got] == list(range(n))
    assert sub.stats().bad_signatures == 0
    sub.close()


def test_a_tampering_store_is_caught_by_a_verifying_subscriber(mesh: Mesh) -> None:
    sub, n = _serve_gone_origin(mesh, tamper=True)
    wait_until(lambda: sub.recv(timeout=0.05) is not None or sub.stats().bad_signatures >= n,
               20, what=lambda: sub.stats())
    assert sub.stats().bad_signatures == n  # every altered event refused
    assert sub.recv(timeout=0.2) is None  # and none delivered
    sub.close()


def test_replicas_without_a_store_raise_a_typed_timeout_and_keep_the_event(
        mesh: Mesh) -> None:
    pn = mesh.add("pub")
    stream = unique("s").replace("-", "")
    with Publisher(pn, stream, replicas=1, replica_timeout_s=0.3,
                   resume_from_stores=0) as pub:
        with pytest.raises(ReplicationTimeout) as ei:
            pub.publish(b"x")
        assert (ei.value.seq, ei.value.want, ei.value.have) == (0, 1, 0)
        assert pub.head == 1  # logged and published all the same
        # A store that appears later replicates it: the explicit wait then returns.
        Store(mesh.add("store"), topics=(stream,))
        pub.wait_replicated(0, 20)
        assert list(pub.stats().replicated.values()) == [1]


def test_bad_store_arguments_are_config_errors(mesh: Mesh) -> None:
    nd = mesh.add("n")
    with pytest.raises(ConfigError, match="topic"):
        Store(nd, topics=())
    with pytest.raises(ConfigError, match="replicas"):
        Publisher(nd, "x", durable=False, replicas=1)
    with Store(nd, topics=("a.",)), pytest.raises(ConfigError, match="already"):
        Store(nd, topics=("b.",))


def test_replica_map_survives_reopen_holes_and_rewinds(tmp_path: Path) -> None:
    cfg = LogConfig()
    rep = _Replica(tmp_path, ORIGIN, "s", cfg)
    rep.append(100, [b"a", b"b", b"c"], 7)  # joined after the origin's retention
    rep.append(105, [b"f"], 7)  # 103..104 skipped at the source: a hole
    assert (rep.oldest, rep.head, rep.epoch) == (100, 106, 7)
    assert rep.locate(103) == (None, 105)
    assert rep.read(101, 10) == (101, [b"b", b"c"])  # one run at most
    rep.close()
    rep = _Replica(tmp_path, ORIGIN, "s", cfg)  # the map is on disk
    assert (rep.oldest, rep.head) == (100, 106)
    assert rep.read(105, 10) == (105, [b"f"])
    # The origin lost seqs >= 102 (a new epoch took them back): they are not served any
    # more, and the new epoch's events take their seqs.
    rep.rewind(102)
    assert rep.head == 102
    rep.append(102, [b"X", b"Y"], 9)
    assert rep.read(100, 10) == (100, [b"a", b"b"])
    assert rep.read(102, 10) == (102, [b"X", b"Y"])
    assert rep.history().entries == [(7, 100), (9, 102)]
    assert rep.history().divergence(7, 105) == 102
    rep.close()
    rep = _Replica(tmp_path, ORIGIN, "s", cfg)
    assert rep.read(102, 10) == (102, [b"X", b"Y"]) and rep.head == 104
    rep.close()


def test_replica_map_written_before_records_that_never_landed(tmp_path: Path) -> None:
    # A crash between the map's fsync and the records' write: the map names a run whose
    # records are not in the log; reopened, the replica holds only what the log holds.
    rep = _Replica(tmp_path, ORIGIN, "s", LogConfig())
    rep.append(0, [b"a", b"b"], 1)
    rep.runs[-1][2] = 2
    rep.runs.append([7, 2, -1])  # as if _save() ran for a new run and epoch, and the
    rep.epochs.append((2, 7))  # append did not
    rep._save()
    rep.close()
    rep = _Replica(tmp_path, ORIGIN, "s", LogConfig())
    assert rep.head == 2 and rep.locate(3) == (None, None)
    assert rep.epoch == 1  # what it serves says the epoch of what it holds
    rep.close()


@pytest.mark.parametrize("body", [
    None, {"v": 1}, {"v": 2, "stream": "s", "epoch": 1, "seq": 1},
    {"v": 1, "stream": "s", "epoch": 1 << 32, "seq": 1},
    {"v": 1, "stream": "s", "epoch": 1, "seq": -1},
])
def test_malformed_replicated_bodies_are_typed_errors(body: object) -> None:
    with pytest.raises((ProtocolError, CodecError)):  # a wrong version: UnsupportedVersion
        frames.decode_replicated(body)


@pytest.mark.parametrize("items", [
    [["nothex", "s", 0, 1, 1]], [[ORIGIN, "s", 5, 1, 1]], [[ORIGIN, "s", 0, 1]],
    [[ORIGIN, 7, 0, 1, 1]], "x", [[ORIGIN, "s", 0, 1, 1]] * (frames.MAX_HOLDINGS + 1),
])
def test_malformed_holdings_are_typed_errors(items: object) -> None:
    with pytest.raises(ProtocolError):
        frames.decode_holdings({"v": 1, "req": 1, "more": False, "items": items})


def test_a_fetch_without_origin_is_malformed() -> None:
    body = frames.ReplayRequest("s1", 1, "t", 0, None, None, 10, 1000).to_body()
    with pytest.raises(ProtocolError, match="origin"):
        frames.decode_fetch(body)
    with pytest.raises(ProtocolError, match="origin"):
        frames.decode_fetch({**body, "origin": "ABC"})


def test_what_the_origins_retention_deleted_is_read_from_a_store_then_live_from_the_origin(
        mesh: Mesh) -> None:
    from mesh.log import Retention

    stream = unique("s").replace("-", "")
    Store(mesh.add("store"), topics=(stream,))
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    cfg = LogConfig(segment_bytes=4096, retention=Retention(max_records=100))
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1, log_config=cfg) as pub:
        for i in range(0, 1000, 50):
            pub.publish_many([b"x" * 100 + str(i + k).encode() for k in range(50)])
        oldest = pub.stats().oldest
        assert oldest > 500, oldest  # the origin deleted most of the stream
        sub = Subscriber(mesh.add("sub"), stream, start=Start.beginning(), on_gap="error")
        got: list[Event] = []
        wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 1000, 20,
                   what=lambda: (len(got), sub.stats()))
        assert [e.seq for e in got] == list(range(1000))  # no RetentionGap: from the store
        assert sub.gaps() == []
        pub.publish(b"live")  # and live from the origin, which is still up
        wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 1001, 10)
        assert got[-1].data == b"live" and got[-1].seq == 1000
        assert sub.stats().lag == 0
        sub.close()


def test_async_publisher_waits_for_replication_without_blocking_the_loop(mesh: Mesh) -> None:
    import asyncio

    from patterns.pubsub.aio import AsyncPublisher

    stream = unique("s").replace("-", "")
    pn = mesh.add("pub")

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)  # a loop that must keep running meanwhile
                ticks += 1

        t = asyncio.create_task(tick())
        async with AsyncPublisher(pn, stream, replicas=1, replica_timeout_s=0.5,
                                  resume_from_stores=0) as pub:
            with pytest.raises(ReplicationTimeout):
                await pub.publish(b"x")
        t.cancel()
        return ticks

    ticks = asyncio.run(main())
    assert ticks >= 10  # the loop ran through the 0.5 s wait


def test_a_live_origin_that_does_not_answer_replays_is_bypassed_through_a_store(
        mesh: Mesh) -> None:
    stream = unique("s").replace("-", "")
    Store(mesh.add("store"), topics=(stream,))
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
        pub.publish_many(list(range(300)))
        pn.handle(frames.CTRL_REPLAY, lambda peer, body: None)  # alive, never answers
        sub = Subscriber(mesh.add("sub"), stream, start=Start.beginning(), retry_s=0.5)
        got: list[Event] = []
        wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 300, 20,
                   what=lambda: (len(got), sub.stats()))
        assert [e.data for e in got] == list(range(300))
        pub.publish(300)  # live data still comes from the origin itself
        wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 301, 10)
        assert got[-1].data == 300
        sub.close()


def test_a_peer_that_fetches_without_reading_is_held_to_its_fetch_budget(mesh: Mesh) -> None:
    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    store = Store(sn, topics=(stream,), fetch_peer_bytes=200_000)
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
        pub.publish_many([b"x" * 10_000] * 100)  # 1 MB
        origin = pn.id
    attacker = mesh.add("attacker")
    wait_until(lambda: attacker.peers.get(sn.id) is not None, 10, what="joined the store")
    replies: list[dict[str, object]] = []
    attacker.handle(frames.CTRL_REPLAY_DATA, lambda peer, body: replies.append(body))

    def fetch(req: int, tok: int | None = None) -> None:
        attacker.send(sn.id, frames.CTRL_FETCH, frames.ReplayRequest(
            "x", req, stream, 0, None, None, 5000, 1 << 20, tok=tok, origin=origin).to_body())

    for req in range(20):  # asks again and again, never proving it read anything
        fetch(req)

    def handled() -> int:
        st = store.stats()
        return st.fetches + st.fetch_refused

    wait_until(lambda: handled() >= 20 and len(replies) >= 2, 10, what=handled)
    sent = sum(len(b"".join(r["events"])) for r in replies)  # type: ignore[arg-type]
    assert sent <= 200_000, sent  # its budget, not 20 x 1 MB
    assert replies[-1]["error"] == "busy" and store.stats().fetch_busy > 0
    # (once not even a refusal fits, requests are not answered at all: bounded either way)
    n = len(replies)
    # Echoing the latest answer's tok proves it read everything before: served again.
    fetch(99, tok=int(replies[-1]["tok"]))  # type: ignore[call-overload]
    wait_until(lambda: len(replies) > n, 10)
    assert replies[-1]["error"] is None and replies[-1]["events"]


def test_a_failed_replica_write_is_asked_for_again_without_a_hole(mesh: Mesh) -> None:
    from mesh.errors import LogFull

    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    store = Store(sn, topics=(stream,))
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
        pub.publish_many(list(range(100)))
        rep = store._replica((pn.id, stream), create=False)
        assert rep is not None
        real = rep.log.append_many
        fails = [3]  # the disk is full for the next three writes

        def full_then_fine(payloads: Any, timestamp_ns: int | None = None) -> range:
            if fails[0]:
                fails[0] -= 1
                raise LogFull(28, "injected: no space left on device")
            return real(payloads, timestamp_ns)

        rep.log.append_many = full_then_fine  # type: ignore[method-assign]
        for i in range(100, 400, 10):
            pub.publish_many(list(range(i, i + 10)))
        pub.wait_replicated(399, 20)
        assert store.stats().write_errors == 3
    got = store.read(pn.id, stream, 0, 1000)
    assert [s for s, _ in got] == list(range(400))  # no hole, no repeat
    assert [decode(e).data for _, e in got] == list(range(400))


def test_a_store_reports_its_copies_as_metrics(mesh: Mesh) -> None:
    from mesh.metrics import parse_prometheus, render_prometheus

    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    Store(sn, topics=(stream,))
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1) as pub:
        pub.publish_many(list(range(7)))
    fams = parse_prometheus(render_prometheus(sn.metrics))
    heads = [(lab["origin"], v) for lab, v in fams["store_replica_head"]
             if lab["stream"] == stream]
    assert heads == [(pn.id, 7)]
    assert fams["store_events_appended_total"] == [({}, 7)]


def test_a_subscriber_on_the_stores_own_node_reads_from_it(mesh: Mesh) -> None:
    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    Store(sn, topics=(stream,))
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1) as pub:
        pub.publish_many(list(range(50)))
    pn.close()
    wait_until(lambda: not mesh.hub.who_offers("stream", name=stream), 10, what="origin gone")
    sub = Subscriber(sn, stream, start=Start.beginning())  # the store's own node
    got: list[Event] = []
    wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 50, 20,
               what=lambda: (len(got), sub.stats()))
    assert [e.data for e in got] == list(range(50))
    sub.close()
