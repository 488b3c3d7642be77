"""Data-socket byte counters on a real node pair: ``data_bytes_in_total`` /
``data_bytes_out_total`` for pub/sub and request/reply, read from a scrape."""

from __future__ import annotations

from mesh import Node
from mesh.metrics import parse_prometheus, render_prometheus
from patterns.pubsub import Publisher, Start, Subscriber
from patterns.reqrep import Client, Incoming, Service
from tests.util import unique, wait_until

N = 20
PAYLOAD = 500


def _scrape(node: Node, metric: str, **labels: str) -> float:
    samples = parse_prometheus(render_prometheus(node.metrics))
    for lab, v in samples.get(metric, []):
        if all(lab.get(k) == val for k, val in labels.items()):
            return v
    return 0.0


def test_pubsub_data_bytes_grow_with_published_events(node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    topic = unique("s")
    with Publisher(a, topic, durable=False) as pub, \
            Subscriber(b, topic, start=Start.new()) as sub:
        out0 = _scrape(a, "data_bytes_out_total", pattern="pubsub", stream=topic)
        # a subscriber only sees what is sent after its SUB is in place: probe until it is
        wait_until(lambda: pub.publish(b"p") >= 0 and sub.recv(timeout=0.2) is not None, 10,
                   what="subscription live")
        in0 = _scrape(b, "data_bytes_in_total", pattern="pubsub", stream=topic)
        out1 = _scrape(a, "data_bytes_out_total", pattern="pubsub", stream=topic)
        assert out1 > out0
        for _ in range(N):
            pub.publish(b"x" * PAYLOAD)
        got = 0
        while got < N:
            ev = sub.recv(timeout=5)
            assert ev is not None
            if ev.data == b"x" * PAYLOAD:
                got += 1
        assert _scrape(a, "data_bytes_out_total", pattern="pubsub",
                       stream=topic) - out1 >= N * PAYLOAD
        assert _scrape(b, "data_bytes_in_total", pattern="pubsub",
                       stream=topic) - in0 >= N * PAYLOAD


def test_reqrep_data_bytes_grow_with_requests(node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    svc = unique("svc")

    def echo(req: Incoming) -> object:
        return req.payload

    with Service(a, svc, echo), Client(b) as client:
        wait_until(lambda: b.who_offers("service", svc), 10, what="service offered")
        for _ in range(N):
            assert client.request(svc, b"y" * PAYLOAD, timeout=5) == b"y" * PAYLOAD
        assert _scrape(a, "data_bytes_in_total", pattern="reqrep", service=svc) >= N * PAYLOAD
        assert _scrape(a, "data_bytes_out_total", pattern="reqrep", service=svc) >= N * PAYLOAD
        # the client side: its requests out, the replies in
        assert _scrape(b, "data_bytes_out_total", pattern="reqrep",
                       side="client") >= N * PAYLOAD
        assert _scrape(b, "data_bytes_in_total", pattern="reqrep", side="client") >= N * PAYLOAD
        assert client.stats().bytes_out >= N * PAYLOAD
    # kept after close (the sockets are gone, the totals stay)
    assert client.stats().bytes_in >= N * PAYLOAD


def test_pipeline_data_bytes_grow_with_tasks(node_pair: tuple[Node, Node]) -> None:
    from patterns.pipeline import Worker, WorkQueue

    a, b = node_pair
    queue = unique("q")
    with WorkQueue(a, queue) as q:
        wait_until(lambda: b.who_offers("queue", queue), 10, what="queue offered")
        with Worker(b, queue, credit=50) as w:
            for _ in range(N):
                q.push(b"y" * PAYLOAD)
            done = 0
            while done < N:
                task = w.get(timeout=5)
                assert task is not None
                task.ack()
                done += 1
            w.flush()
            q.wait_idle(10)
            # Tasks went out of the queue's ROUTER and into the worker's DEALER; acks came back.
            labels = {"pattern": "pipeline", "queue": queue}
            assert _scrape(a, "data_bytes_out_total", side="queue", **labels) >= N * PAYLOAD
            assert _scrape(b, "data_bytes_in_total", side="worker", **labels) >= N * PAYLOAD
            assert _scrape(a, "data_bytes_in_total", side="queue", **labels) > 0
            assert _scrape(b, "data_bytes_out_total", side="worker", **labels) > 0
