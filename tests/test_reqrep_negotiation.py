"""Request/reply version signal (1.3) and negotiation: every message carries its revision
(``rev``, the last META item), and a responder answers a caller in the form it used, so a 1.0
caller (split form only, no ``rev``) is served. Real sockets, a real node and service."""

from __future__ import annotations

from pathlib import Path

import msgpack
import zmq

from mesh.node import Node
from patterns.reqrep import Service
from patterns.reqrep import frames as fr
from tests.util import unique, wait_until


def test_every_message_shows_its_revision() -> None:
    req = fr.Request("id-1", "svc", 1000, 0, fr.Format.BYTES, {}, b"x")
    for frames in (fr.encode_request(req), fr.encode_ping(fr.Ping(1, "id-1")),
                   fr.encode_reply(fr.Reply("id-1", fr.Status.OK, 3, fr.Format.BYTES)),
                   fr.encode_pong(fr.Pong(1, 3, "id-1", fr.TaskState.DONE))):
        assert fr.revision(frames) == fr.REVISION == 4
        assert fr.revision(fr.to_split(frames)) == 4
    old_split = [b"ZRR1\x01", msgpack.packb(["i", "svc", 10, 0, 0, {}]), b"x"]
    old_compact = [b"ZRR1\x01" + msgpack.packb([["i", "svc", 10, 0, 0, {}], b"x"])]
    assert fr.revision(old_split) == 0 and fr.revision(old_compact) == 1
    assert fr.decode(old_split) == fr.decode(old_compact)  # both still accepted


def test_a_1_0_caller_gets_split_replies_and_a_compact_caller_compact(tmp_path: Path) -> None:
    node = Node(data_dir=tmp_path / "n", name="n", mesh=unique("m"), interface="127.0.0.1",
                mdns=False)
    name = unique("svc")
    ctx = zmq.Context.instance()
    try:
        with Service(node, name, lambda r: r.payload, outcome_log=False):
            ep = next(e for e in node.info().endpoints[f"rpc.{name}"] if e.startswith("tcp"))
            rid = f"{node.id}/{name}".encode()
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ep)
            try:
                meta = ["r-1", name, 5000, 0, 0, {}]  # a 1.0 REQUEST: split, no rev
                wait_until(lambda: _try_send(sock, [rid, b"ZRR1\x01", msgpack.packb(meta),
                                                    b"hi"]), 5, what="routable")
                assert sock.poll(5000)
                got = sock.recv_multipart()
                assert len(got) == 4 and got[1] == b"ZRR1\x02" and got[3] == b"hi"
                rep = fr.decode(got[1:])
                assert isinstance(rep, fr.Reply) and rep.status is fr.Status.OK
                # a 1.1+ caller (compact) gets the compact form, with rev
                sock.send_multipart([rid, *fr.encode_request(
                    fr.Request("r-2", name, 5000, 0, fr.Format.BYTES, {}, b"yo"))])
                assert sock.poll(5000)
                got = sock.recv_multipart()
                assert len(got) == 2 and fr.revision(got[1:]) == fr.REVISION
                assert fr.decode(got[1:]).body == b"yo"  # type: ignore[union-attr]
            finally:
                sock.close(0)
    finally:
        node.close()


def _try_send(sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    try:
        sock.send_multipart(frames)
        return True
    except zmq.ZMQError:  # EHOSTUNREACH until the handshake completed
        return False
