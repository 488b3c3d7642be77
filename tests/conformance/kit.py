"""A zeromesh protocol client written from docs/protocol.md alone: pyzmq and msgpack only
(it never imports ``mesh`` or ``patterns``; tests/test_conformance.py checks that).

Covered: join (HELLO and its answer), presence (``ping``/``pong``), request/reply (a call,
a retry with the same id answered from the cache, ``ttl_ms`` 0 EXPIRED, an unknown service),
pub/sub replay from a durable stream (``max`` optional, a malformed request refused with
``error = "malformed"``), and the control channel's unexpected-input rule for a kind before
``hello``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq


def poll_until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll ``cond`` until true (True) or ``timeout`` passes (False), backing off from 5 ms to
    50 ms. The kit's own copy of tests/util.py poll_until: it imports nothing of the project."""
    deadline, interval = time.monotonic() + timeout, 0.005
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))  # a poll interval, not a wait
        interval = min(interval * 1.5, 0.05)
    return True


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)  # type: ignore[no-any-return]


def header(kind: str) -> bytes:
    """Control header: "ZM", version 1, kind length, kind."""
    raw = kind.encode("ascii")
    return b"ZM\x01" + bytes([len(raw)]) + raw


class Peer:
    """One conformance peer: a bound control ROUTER and a DEALER to the target."""

    def __init__(self, target: str, mesh: str = "conformance") -> None:
        self.ctx = zmq.Context.instance()
        self.id = os.urandom(16).hex()
        self.mesh = mesh
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.dealer = self.dealer_to(target)
        self.target_info: dict[str, Any] = {}

    def dealer_to(self, endpoint: str) -> zmq.Socket[bytes]:
        """A DEALER whose routing id is our node id + 8 random bytes."""
        d = self.ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.ROUTING_ID, self.id.encode() + os.urandom(8))
        d.connect(endpoint)
        return d

    def info(self) -> dict[str, Any]:
        """Our HELLO info map."""
        return {"node_id": self.id, "name": "conformance-kit", "mesh": self.mesh,
                "version": 1, "host": "conformance-kit-host",
                "endpoints": {"control": [self.endpoint]}, "offers": {}}

    def send(self, kind: str, body: Any, sock: zmq.Socket[bytes] | None = None) -> None:
        """Send one (header, body) pair."""
        (sock or self.dealer).send_multipart([header(kind), _pack(body)])

    def recv(self, kind: str, timeout: float = 5.0) -> Any:
        """The body of the next control message of ``kind`` on our ROUTER (others skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.router.poll(int(left * 1000) + 1):
                break
            frames = self.router.recv_multipart()
            for i in range(1, len(frames) - 1, 2):
                h = frames[i]
                assert h[:2] == b"ZM" and h[2] == 1, f"bad header {h!r}"
                if h[4:4 + h[3]].decode() == kind:
                    return msgpack.unpackb(frames[i + 1], raw=False, strict_map_key=False)
        raise TimeoutError(f"no {kind!r} within {timeout} s")

    def join(self) -> dict[str, Any]:
        """HELLO; return the target's info from its answering HELLO (reply true)."""
        self.send("hello", {"info": self.info(), "reply": False})
        body = self.recv("hello")
        assert body["reply"] is True, body
        info = body["info"]
        for key in ("node_id", "name", "mesh", "version"):
            assert key in info, f"HELLO info lacks required {key!r}"
        assert info["mesh"] == self.mesh and info["version"] == 1
        self.target_info = info
        return info

    def replay(self, body: dict[str, Any]) -> Any:
        """Send ``pubsub.replay`` and return the ``pubsub.replay_data`` answering its ``req``."""
        self.send("pubsub.replay", body)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = self.recv("pubsub.replay_data", timeout=max(0.01, deadline - time.monotonic()))
            if got.get("req") == body["req"]:
                return got
        raise TimeoutError("no pubsub.replay_data")

    def close(self) -> None:
        """Say BYE and close the sockets."""
        try:
            self.send("bye", None)
        finally:
            self.dealer.close(0)
            self.router.close(0)


class QueueWorker:
    """A pipeline worker: a DEALER (16 random bytes of routing id) to ``pipe.<queue>``."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self.sock.connect(endpoint)

    def send(self, cmd: int, body: Any) -> None:
        """One pipeline message: header (version 1, command), msgpack body."""
        self.sock.send_multipart([bytes([1, cmd]), _pack(body)])

    def task(self, timeout: float = 5.0) -> list[Any]:
        """The items of the next non-empty TASK (empty TASKs are liveness probes)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            head, body = self.sock.recv_multipart()
            assert head == b"\x01\x02", head
            items = msgpack.unpackb(body, raw=False)
            if items:
                return items  # type: ignore[no-any-return]
        raise TimeoutError("no TASK")

    def quiet(self, seconds: float) -> bool:
        """True when no non-empty TASK arrives for ``seconds``."""
        try:
            self.task(seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


class Caller:
    """A request/reply caller: a ROUTER with ROUTER_MANDATORY connected to ``rpc.<service>``."""

    def __init__(self, endpoint: str, node_id: str, service: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.rid = f"{node_id}/{service}".encode()

    def request(self, rid: str, service: str, body: bytes, ttl_ms: int = 5000,
                attempt: int = 0, timeout: float = 5.0) -> list[Any]:
        """Send a compact REQUEST (retrying EHOSTUNREACH until the handshake completed) and
        return ``[META, BODY]`` of the REPLY."""
        meta = [rid, service, ttl_ms, attempt, 0, {}]
        frame = b"ZRR1\x01" + _pack([meta, body])
        def sent() -> bool:
            try:
                self.sock.send_multipart([self.rid, frame])
                return True
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                return False

        assert poll_until(sent, timeout), "the responder's handshake never completed"
        assert self.sock.poll(int(timeout * 1000)), "no REPLY"
        frames = self.sock.recv_multipart()[1:]
        if len(frames) == 1:  # compact
            assert frames[0][:5] == b"ZRR1\x02"
            meta_body = msgpack.unpackb(frames[0][5:], raw=False)
        else:  # split
            assert len(frames) == 3 and frames[0] == b"ZRR1\x02"
            meta_body = [msgpack.unpackb(frames[1], raw=False), frames[2]]
        assert meta_body[0][0] == rid, meta_body
        return meta_body  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)
