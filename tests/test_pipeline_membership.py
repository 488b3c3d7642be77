"""Who is announced and who is a worker: a vanished worker is removed at once (its tasks go
back), and what a pattern closes is no longer announced (a reopened queue or publisher is
reachable). Real nodes, sockets and SIGKILLed processes."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.node import Node, PresenceConfig
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.queue import WorkQueue, role_for
from patterns.pipeline.worker import Task, Worker
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from patterns.reqrep.service import Service, service_role
from tests.test_pipeline_real import children, ctrl, journal_acks, make_node, spawn_worker
from tests.util import unique, wait_until

__all__ = ["children"]  # the fixture, re-exported for pytest

# Presence that would call a dead node gone only after 20 s: what removes a SIGKILLed worker
# here is the end of its connection.
SLOW_PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=10.0, gone_s=20.0)


@pytest.fixture
def slow_hub(tmp_path: Path) -> Iterator[tuple[Node, str]]:
    mesh = unique("pm")
    node = Node(data_dir=tmp_path / "hub", name="hub", mesh=mesh, interface="127.0.0.1",
                mdns=False, presence=SLOW_PRESENCE)
    yield node, mesh
    node.close()


def test_sigkilled_worker_removed_and_its_tasks_redelivered_promptly(
    tmp_path: Path, slow_hub: tuple[Node, str], children: list[subprocess.Popen[bytes]]
) -> None:
    hub, mesh = slow_hub
    queue = unique("q")
    cfg = DispatchConfig(ack_wait=60.0, max_deliveries=5)  # no deadline rescues the tasks
    with WorkQueue(hub, queue, config=cfg) as q:
        holder = spawn_worker(children, tmp_path, mesh, ctrl(hub), queue, 5, "hold")
        wait_until(lambda: q.stats().get("workers") == 1, timeout=10, what="holder ready")
        q.push_many([f"t{i}".encode() for i in range(5)])
        wait_until(lambda: q.stats().get("inflight") == 5, timeout=5, what="held")
        spawn_worker(children, tmp_path, mesh, ctrl(hub), queue, 5, "ack")
        wait_until(lambda: q.stats().get("workers") == 2, timeout=10, what="acker ready")
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        # Removed by its connection's end, far sooner than presence (20 s) or ack_wait (60 s).
        wait_until(lambda: q.stats().get("workers") == 1, timeout=3, what="holder removed")
        q.wait_idle(timeout=5)
        s = q.stats()
        assert s["acked"] == 5 and s["workers_lost"] == 1 and s["tasks_returned"] == 5, s
        assert s["timeouts"] == 0 and s["disconnects"] == 1, s
    assert sorted(journal_acks(hub.data_dir, queue)) == list(range(5))


def test_work_queue_closed_and_reopened_is_reachable_by_a_later_worker(
    tmp_path: Path,
) -> None:
    mesh = unique("pm")
    hub = make_node(tmp_path / "hub", mesh, "hub")
    wnode = make_node(tmp_path / "w", mesh, "w", ctrl(hub))
    queue = unique("q")
    stop = threading.Event()
    t: threading.Thread | None = None
    try:
        WorkQueue(hub, queue).close()
        with WorkQueue(hub, queue) as q:
            # Only the open queue's endpoints are announced, here and at the peer.
            assert set(hub.info().endpoints[role_for(queue)]) == set(q.endpoints)
            wait_until(lambda: any(
                set(p.endpoints.get(role_for(queue), ())) == set(q.endpoints)
                for p in wnode.peers.list()), timeout=5, what="peer sees the new endpoints")
            done: list[int] = []
            with Worker(wnode, queue, credit=10) as w:

                def handler(task: Task) -> None:
                    done.append(task.id)

                t = threading.Thread(target=w.run, args=(handler,), kwargs={"stop": stop},
                                     daemon=True)
                t.start()
                q.push_many([b"x"] * 20)
                q.wait_idle(timeout=5)
                assert q.stats()["acked"] == 20 and sorted(done) == list(range(20))
                stop.set()
                t.join(5)
        assert role_for(queue) not in hub.info().endpoints  # closed: nothing announced
    finally:
        stop.set()
        wnode.close()
        hub.close()


def test_publisher_closed_and_reopened_reaches_a_remote_subscriber_live(
    tmp_path: Path,
) -> None:
    mesh = unique("ps")
    a = make_node(tmp_path / "a", mesh, "a")
    b = make_node(tmp_path / "b", mesh, "b", ctrl(a))
    stream = unique("s")
    try:
        wait_until(lambda: a.id in {p.node_id for p in b.peers.list()}, 5, what="peering")
        # Best effort: no log, no replay: whatever arrives came live over the pub socket.
        with Subscriber(b, stream, start=Start.new()) as sub:
            with Publisher(a, stream, durable=False, linger_s=0) as pub:
                old_eps = set(pub.endpoints)
                wait_until(lambda: (pub.publish("first"), sub.recv(timeout=0.05))[1]
                           is not None, 5, what="first publisher heard")
            assert "pubsub" not in a.info().endpoints  # the hub closed: nothing announced
            with Publisher(a, stream, durable=False, linger_s=0) as pub2:
                assert set(a.info().endpoints["pubsub"]) == set(pub2.endpoints)
                # Its tcp port may be the closed hub's (recorded ports are bound again when
                # free) or another; its ipc path is new. Either way it must be heard live.
                assert old_eps != set(pub2.endpoints)

                def heard_second() -> bool:
                    pub2.publish("second")
                    while (e := sub.recv(timeout=0.05)) is not None:
                        if e.data == "second":
                            return True
                    return False

                wait_until(heard_second, 10,
                           what="the new publisher's events reach the subscriber live")
    finally:
        b.close()
        a.close()


def test_service_closed_is_no_longer_announced(tmp_path: Path) -> None:
    node = make_node(tmp_path / "n", unique("rr"), "n")
    try:
        name = unique("svc")
        svc = Service(node, name, lambda req: req)
        assert service_role(name) in node.info().endpoints
        svc.close()
        assert service_role(name) not in node.info().endpoints
        with Service(node, name, lambda req: req) as svc2:
            assert set(node.info().endpoints[service_role(name)]) == set(svc2.endpoints)
    finally:
        node.close()
