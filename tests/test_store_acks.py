"""A store's replication acks (patterns/pubsub/store.py): never for a record not fsynced.

Real nodes, sockets and files in one process. Every ``pubsub.replicated`` the store sends is
checked at the moment it is sent against its replica log's durable offset (what the log has
fsynced), whatever path the ack takes (``Node.send`` or ``Node.send_now``). The replica logs'
own background fsync is pushed out of the way (60 s), so only the store's fsync before the
ack can make a record durable in time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.log import FsyncPolicy, LogConfig
from patterns.pubsub import frames
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import Store, _Replica
from tests.test_store import Mesh
from tests.util import unique, wait_until


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.close()


def test_a_replication_ack_is_sent_only_for_records_already_fsynced(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    store = Store(sn, topics=(stream,),
                  log_config=LogConfig(fsync=FsyncPolicy.interval(60_000.0)))
    pn = mesh.add("pub")
    acked: list[int] = []
    early: list[tuple[int, int | None, int | None]] = []

    def check(kind: str, body: Any) -> None:
        if kind != frames.CTRL_REPLICATED:
            return
        rp = frames.decode_replicated(body)
        rep = store._replica((pn.id, rp.stream), create=False)
        assert rep is not None
        local, _left = rep.locate(rp.seq - 1)  # the last record the ack says is held
        durable = rep.log.stats().durable_offset
        acked.append(rp.seq)
        if local is None or durable is None or durable < local:
            early.append((rp.seq, local, durable))

    send = sn.send
    send_now = getattr(sn, "send_now", None)  # (older builds acked through send alone)

    def checked_send(peer: str, kind: str, body: Any) -> None:
        check(kind, body)
        send(peer, kind, body)

    def checked_send_now(peer: str, messages: Any) -> None:
        for kind, body in messages:
            check(kind, body)
        assert send_now is not None
        send_now(peer, messages)

    monkeypatch.setattr(sn, "send", checked_send)
    if send_now is not None:
        monkeypatch.setattr(sn, "send_now", checked_send_now)
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
        for i in range(100):
            pub.publish(i)  # one at a time: an fsync and an ack per event
        for _ in range(5):
            pub.publish_many([b"x" * 100] * 500)
        head = pub.stats().head
    wait_until(lambda: acked and max(acked) >= head, 10, what=lambda: (head, acked[-3:]))
    assert len(acked) >= 100
    assert early == [], early[:5]


def test_sync_write_is_an_opt_in_that_acks_before_the_fsync(mesh: Mesh) -> None:
    from mesh.errors import ConfigError

    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    with pytest.raises(ConfigError, match="sync"):
        Store(sn, topics=(stream,), sync="memory")
    store = Store(sn, topics=(stream,), sync="write",
                  log_config=LogConfig(fsync=FsyncPolicy.interval(60_000.0)))
    assert store.sync == "write"
    pn = mesh.add("pub")
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1, replica_timeout_s=10) as pub:
        for i in range(50):
            pub.publish(i)  # each returns once the store acked it
    rep = store._replica((pn.id, stream), create=False)
    assert rep is not None and rep.head == 50
    st = rep.log.stats()
    # Acked without an fsync: the log's own policy (60 s here) has not run yet.
    assert st.fsyncs == 0 and st.durable_offset is None, st
    assert store.durable()[(pn.id, stream)][1] == 50


def test_a_power_cut_right_after_an_ack_keeps_every_acked_event(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The replica directory (log, REPLICA map, EPOCHS) as it is at the moment an ack leaves
    (copied from the store thread between the fsync and the send: the test above shows that
    everything in it up to the acked seq is fsynced then, and nothing is written in between),
    plus a torn record that was being written when the power went: reopened, the copy holds
    every acked seq, byte for byte the origin's, under the origin's epoch, and nothing more."""
    import shutil

    from mesh.log import LogDirectory

    stream = unique("s").replace("-", "")
    sn = mesh.add("store")
    store = Store(sn, topics=(stream,))
    pn = mesh.add("pub")
    cut: dict[str, Any] = {}
    send = sn.send
    send_now = getattr(sn, "send_now", None)  # (older builds acked through send alone)

    def snapshot(kind: str, body: Any) -> None:
        if kind == frames.CTRL_REPLICATED and "seq" not in cut:
            rp = frames.decode_replicated(body)
            if rp.seq >= 150:
                rep = store._replica((pn.id, rp.stream), create=False)
                assert rep is not None
                shutil.copytree(rep.path, tmp_path / "cut" / pn.id / "streams" / stream)
                cut["seq"] = rp.seq

    def snapshot_then_send(peer: str, kind: str, body: Any) -> None:
        snapshot(kind, body)
        send(peer, kind, body)

    def snapshot_then_send_now(peer: str, messages: Any) -> None:
        for kind, body in messages:
            snapshot(kind, body)
        assert send_now is not None
        send_now(peer, messages)

    monkeypatch.setattr(sn, "send", snapshot_then_send)
    if send_now is not None:
        monkeypatch.setattr(sn, "send_now", snapshot_then_send_now)
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    with Publisher(pn, stream, replicas=1, heartbeat_s=0.1) as pub:
        for i in range(100):
            pub.publish(i)
        for _ in range(4):
            pub.publish_many([b"y" * 200] * 50)
    acked = cut["seq"]
    d = tmp_path / "cut" / pn.id / "streams" / stream
    seg = max(p for p in d.iterdir() if p.suffix == ".log")  # the last segment
    with open(seg, "ab") as f:
        f.write(b"\x07" * 37)  # a record half written when the power went
    rep = _Replica(tmp_path / "cut", pn.id, stream, LogConfig())
    try:
        assert rep.head == acked and rep.epoch == pub.stats().epoch
        got = [e for _, e in _read_all(rep, acked)]
    finally:
        rep.close()
    log = LogDirectory(pn.data_dir).open(stream, readonly=True)
    try:
        want = log.read_batch_payloads(0, acked)[1]
    finally:
        log.close()
    assert len(got) == acked and got == want


def _read_all(rep: _Replica, end: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    seq = 0
    while seq < end:
        first, envs = rep.read(seq, end - seq)
        out.extend((first + i, e) for i, e in enumerate(envs))
        seq = first + len(envs)
    return out
