"""One message is bounded in all its frames on the request/reply and work-queue sockets
(MAXMSGSIZE bounds each frame only): an oversize multipart is drained without copies and
counted, and the socket stays aligned on the next message. Real sockets."""

from __future__ import annotations

from pathlib import Path

import zmq

from mesh.node import Node
from patterns.reqrep import Client, Service
from patterns.reqrep._zio import recv_frames
from tests.util import ctrl, make_node, unique, wait_until


def test_recv_frames_refuses_an_oversize_multipart_and_keeps_alignment() -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    addr = f"inproc://{unique('b')}"
    a.bind(addr)
    b.connect(addr)
    try:
        b.send_multipart([b"x" * 1000] * 50)  # 50 kB in frames of 1 kB
        b.send_multipart([b"ok", b"fine"])
        wait_until(lambda: a.poll(0), 5, what="message waiting")
        assert recv_frames(a, 10_000) == []  # refused, drained
        assert recv_frames(a, 10_000) == [b"ok", b"fine"]  # the next one intact
        assert recv_frames(a, 10_000) is None
    finally:
        a.close(0)
        b.close(0)


def test_a_service_drops_an_oversize_multipart_and_keeps_serving(tmp_path: Path) -> None:
    mesh = unique("m")
    hub = make_node(tmp_path / "hub", mesh)
    srv = Node(data_dir=tmp_path / "srv", name="srv", mesh=mesh, interface="127.0.0.1",
               mdns=False, max_message_bytes=64 << 10, static_peers=(ctrl(hub),))
    name = unique("svc")
    try:
        with Service(srv, name, lambda r: r.payload, outcome_log=False) as svc, \
                Client(hub) as client:
            wait_until(lambda: hub.who_offers("service", name), 10, what="offered")
            ep = next(e for e in srv.info().endpoints[f"rpc.{name}"] if e.startswith("tcp"))
            raw = zmq.Context.instance().socket(zmq.DEALER)
            raw.connect(ep)
            try:
                # 40 frames of 60 KiB: each under MAXMSGSIZE, 2.4 MB in all
                raw.send_multipart([b"ZRR1"] + [b"y" * (60 << 10)] * 40)
                wait_until(lambda: svc.stats().garbage >= 1, 10, what="counted")
            finally:
                raw.close(0)
            assert client.request(name, b"still here", timeout=5) == b"still here"
    finally:
        srv.close()
        hub.close()
