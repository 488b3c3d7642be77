"""``Publisher(replicas=k)`` under threads and asyncio cancellation (real nodes, sockets and
files): one publisher shared by several threads gives every caller its own seq and every
event reaches the store; a cancelled ``await publish()`` has still published its event (the
cancellation abandons only the wait for the stores) and leaves no worker thread behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from mesh.envelope import decode
from mesh.errors import ReplicationTimeout
from mesh.node import Node, PresenceConfig
from patterns.pubsub import frames
from patterns.pubsub.aio import AsyncPublisher
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import Store
from tests.util import unique, wait_until

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    mesh = unique("stc")
    hub = Node(data_dir=tmp_path / "hub", name="hub", mesh=mesh, mdns=False,
               interface="127.0.0.1", presence=PRESENCE)
    out = [hub]
    seed = hub.info().endpoints["control"][0]
    for name in ("pub", "store"):
        out.append(Node(data_dir=tmp_path / name, name=name, mesh=mesh, mdns=False,
                        interface="127.0.0.1", static_peers=(seed,), presence=PRESENCE))
    yield out
    for nd in reversed(out):
        nd.close()


def test_threads_sharing_a_replicated_publisher_each_get_their_own_seq(
        nodes: list[Node]) -> None:
    _hub, pn, sn = nodes
    stream = unique("s").replace("-", "")
    store = Store(sn, topics=(stream,))
    wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10, what="store")
    per_thread, n_threads = 60, 4
    seqs: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with Publisher(pn, stream, replicas=1, replica_timeout_s=20, heartbeat_s=0.1) as pub:
        def work(t: int) -> None:
            try:
                for i in range(per_thread):
                    s = pub.publish({"t": t, "i": i})
                    with lock:
                        seqs.append(s)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
        total = per_thread * n_threads
        assert sorted(seqs) == list(range(total))  # every call its own seq, none lost
        # Every publish() returned after the store acked it: the store holds all of them.
        held = store.read(pn.id, stream, 0, total + 10)
        assert [s for s, _ in held] == list(range(total))
        got = sorted((d["t"], d["i"]) for d in (decode(e).data for _, e in held))
        assert got == sorted((t, i) for t in range(n_threads) for i in range(per_thread))


def test_a_cancelled_async_replicated_publish_has_published_and_frees_its_thread(
        nodes: list[Node]) -> None:
    _hub, pn, sn = nodes
    stream = unique("s").replace("-", "")
    n = 12  # more than the default executor's workers on a small machine

    async def main() -> None:
        apub = AsyncPublisher(pn, stream, replicas=1, replica_timeout_s=3.0,
                              resume_from_stores=0, heartbeat_s=0.1)
        try:
            for i in range(n):
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(apub.publish(i), 0.02)
            # Each cancelled call had published its event before waiting for the stores.
            assert apub.sync.head == n
            # ... and no thread is still blocked waiting for a store on its behalf.
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 1.0) == 7
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(apub.publish_many(range(5)), 0.02)
            assert apub.sync.head == n + 5
            # A store that comes later holds them all: the explicit wait returns.
            Store(sn, topics=(stream,))
            await asyncio.wait_for(apub.wait_replicated(n + 4, 20), 25)
            # A cancelled explicit wait leaves nothing behind either.
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(apub.wait_replicated(10**9, 30), 0.02)
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 8), 1.0) == 8
            # And the typed timeout still comes through an uncancelled wait.
            with pytest.raises(ReplicationTimeout):
                await apub.wait_replicated(10**9, 0.2)
        finally:
            await apub.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))
