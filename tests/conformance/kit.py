"""A zeromesh protocol client written from docs/protocol.md alone: pyzmq and msgpack only
(it never imports ``mesh`` or ``patterns``; tests/test_conformance.py checks that).

Pieces, each named after the part of docs/protocol.md it speaks:

* :class:`Peer`: the control channel (a bound ROUTER, a DEALER to the target): HELLO, ping/pong
  (every ``ping`` it reads is answered, so its link verifies), gossip, replay requests, and
  frames built by hand for the unexpected-input rules;
* :class:`DataSub`: a subscriber's data connection (a ROUTER with ``CONNECT_ROUTING_ID``) to a
  publisher's ``pubsub`` endpoint: subscription requests, DATA / HEARTBEAT / REFUSED / PING;
* :class:`DataPub`: a publisher's data socket (a bound ROUTER) that a zeromesh subscriber
  connects to, and :func:`envelope` / :func:`decode_envelope` for the event envelope;
* :class:`QueueWorker`: a pipeline worker; :class:`Caller`: a request/reply caller.

How a target is run is in tests/conformance/README.md.
"""

from __future__ import annotations

import os
import struct
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
    """One conformance peer: a bound control ROUTER and a DEALER to the target.

    ``offers`` and ``endpoints`` (besides ``control``) go into its HELLO info, so a peer can
    announce a stream and the data endpoint of a :class:`DataPub`."""

    def __init__(self, target: str, mesh: str = "conformance",
                 offers: dict[str, list[str]] | None = None,
                 endpoints: dict[str, list[str]] | None = None) -> None:
        self.ctx = zmq.Context.instance()
        self.id = os.urandom(16).hex()
        self.mesh = mesh
        self.offers = offers or {}
        self.extra_endpoints = endpoints or {}
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.dealer = self.dealer_to(target)
        self.target_info: dict[str, Any] = {}
        #: routing id (frame 0 on our ROUTER) of the message :meth:`recv` returned last
        self.last_rid = b""
        #: pings read (each answered with a pong on our DEALER)
        self.pings = 0

    def dealer_to(self, endpoint: str, node_id: str | None = None) -> zmq.Socket[bytes]:
        """A DEALER whose routing id is ``node_id`` (default ours) + 8 random bytes."""
        d = self.ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.ROUTING_ID, (node_id or self.id).encode() + os.urandom(8))
        d.connect(endpoint)
        return d

    def info(self) -> dict[str, Any]:
        """Our HELLO info map."""
        return {"node_id": self.id, "name": "conformance-kit", "mesh": self.mesh,
                "version": 1, "host": "conformance-kit-host",
                "endpoints": {"control": [self.endpoint], **self.extra_endpoints},
                "offers": self.offers}

    def send(self, kind: str, body: Any, sock: zmq.Socket[bytes] | None = None) -> None:
        """Send one (header, body) pair."""
        (sock or self.dealer).send_multipart([header(kind), _pack(body)])

    def poll(self, timeout: float) -> list[tuple[str, Any]]:
        """The (kind, body) pairs of the next multipart on our ROUTER within ``timeout`` s
        (empty when none came). A ``ping`` is answered with a ``pong`` echoing its body (an
        int, else nil) and is not returned."""
        if not self.router.poll(max(1, int(timeout * 1000))):
            return []
        frames = self.router.recv_multipart()
        assert len(frames) >= 3 and len(frames) % 2 == 1, f"bad control multipart {frames!r}"
        out = []
        for i in range(1, len(frames) - 1, 2):
            h = frames[i]
            assert h[:2] == b"ZM" and h[2] == 1 and len(h) == 4 + h[3], f"bad header {h!r}"
            kind = h[4:].decode("ascii")
            body = msgpack.unpackb(frames[i + 1], raw=False, strict_map_key=False)
            if kind == "ping":
                self.pings += 1
                self.send("pong", body if isinstance(body, int) else None)
                continue
            out.append((kind, body))
        self.last_rid = frames[0]
        return out

    def recv(self, kind: str, timeout: float = 5.0) -> Any:
        """The body of the next control message of ``kind`` on our ROUTER (others skipped,
        pings answered)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for k, body in self.poll(left):
                if k == kind:
                    return body
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


def stranger(target: str, node_id: str | None = None, mesh: str = "conformance",
             endpoints: dict[str, list[str]] | None = None) -> tuple[str, zmq.Socket[bytes]]:
    """A DEALER (routing id: the node id + 8 random bytes) that has sent one ``hello`` for
    ``node_id`` (default a new one) announcing ``endpoints`` (default none); (id, socket)."""
    nid = node_id or os.urandom(16).hex()
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.ROUTING_ID, nid.encode() + os.urandom(8))
    d.connect(target)
    info = {"node_id": nid, "name": "conformance-stranger", "mesh": mesh, "version": 1,
            "host": "conformance-kit-host", "endpoints": endpoints or {}, "offers": {}}
    d.send_multipart([header("hello"), _pack({"info": info, "reply": False})])
    return nid, d


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


def pump(peers: list[Peer], cond: Callable[[], bool], timeout: float,
         on_message: Callable[[Peer, str, Any], None] | None = None) -> bool:
    """Read every peer's ROUTER (answering pings, handing other messages to ``on_message``)
    until ``cond()`` is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    for p in peers:
        poller.register(p.router, zmq.POLLIN)
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready = dict(poller.poll(max(1, int(min(left, 0.05) * 1000))))
        for p in peers:
            if p.router in ready:
                for kind, body in p.poll(0):
                    if on_message is not None:
                        on_message(p, kind, body)
    return True


# --- event envelope (docs/protocol.md "Event envelope") -------------------------------------

def envelope(stream: str, seq: int, data: Any, type_: str = "kit.event",
             source: str = "conformance-kit") -> bytes:
    """A 15-element version 1.0 envelope of a published event."""
    eid = os.urandom(16).hex()
    return _pack([1, 0, stream, seq, eid, time.time_ns() // 1000, type_, source,
                  None, None, None, None, None, {}, data])


def decode_envelope(raw: bytes) -> list[Any]:
    """Decode an envelope and check its layout (the field table of "Layout"); the array."""
    ev = msgpack.unpackb(raw, raw=False)
    assert isinstance(ev, list) and len(ev) in (15, 16), ev
    assert ev[0] == 1 and isinstance(ev[1], int), ev[:2]
    assert isinstance(ev[2], str) and (ev[3] is None or isinstance(ev[3], int)), ev[2:4]
    assert isinstance(ev[4], str) and ev[4], "id"
    assert isinstance(ev[5], int) and not isinstance(ev[5], bool), "time"
    assert isinstance(ev[6], str) and ev[6] and isinstance(ev[7], str) and ev[7]
    for i in range(8, 13):
        assert ev[i] is None or isinstance(ev[i], str), (i, ev[i])
    assert isinstance(ev[13], dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in ev[13].items()), ev[13]
    if len(ev) == 16:
        assert isinstance(ev[15], dict)
    return ev


# --- pub/sub data socket (docs/protocol.md "Pub/sub protocol" 1) ----------------------------

DATA, HEARTBEAT, REFUSED, PING = 1, 2, 3, 4
DURABLE = 0x01
#: header flag (pub/sub 2.4): frame 2 holds all ``count`` envelopes back to back
PACKED = 0x02
#: subscription request flag (pub/sub 2.4): the subscriber takes packed DATA
SUB_PREFIX, SUB_PACKED = 0x01, 0x02
_HEAD = struct.Struct("!BBBx16sIQI")


def data_header(kind: int, publisher: str, epoch: int, seq: int, count: int,
                flags: int = DURABLE, version: int = 1) -> bytes:
    """The 36-byte data header (big-endian ``!BBBx16sIQI``); ``publisher`` as 32 hex chars."""
    return _HEAD.pack(version, kind, flags, bytes.fromhex(publisher), epoch, seq, count)


class DataMsg:
    """One publisher -> subscriber message, its header checked against the grammar."""

    def __init__(self, frames: list[bytes]) -> None:
        assert len(frames) >= 2, frames
        self.topic = frames[0].decode("utf-8")
        assert len(frames[1]) == 36, f"header of {len(frames[1])} bytes"
        (version, self.kind, self.flags, pub, self.epoch, self.seq,
         self.count) = _HEAD.unpack(frames[1])
        assert version == 1 and self.kind in (1, 2, 3, 4), frames[1]
        assert self.flags in ((0, 1, 2, 3) if self.kind == DATA else (0, 1)), frames[1]
        assert frames[1][3] == 0, "reserved byte"
        self.publisher = pub.hex()
        self.envelopes = frames[2:]
        self.packed = bool(self.flags & PACKED)
        if self.packed:
            assert len(self.envelopes) == 1, "a packed DATA message has one envelope frame"
            self.envelopes = split_packed(frames[2], self.count)
        if self.kind == DATA:
            assert self.count == len(self.envelopes) >= 1, (self.count, len(self.envelopes))
        else:
            assert not self.envelopes, "only DATA carries envelopes"
        if self.kind in (DATA, HEARTBEAT):
            assert 1 <= len(frames[0]) <= 255, "topic"
        if self.kind == PING:
            assert (self.topic, self.flags, self.epoch, self.seq, self.count) == (
                "", 0, 0, 0, 0), "PING: empty topic, the publisher id, everything else 0"


def split_packed(blob: bytes, count: int) -> list[bytes]:
    """The ``count`` envelopes of a packed DATA frame: msgpack values back to back, nothing
    before, between or after them."""
    u = msgpack.Unpacker(max_buffer_size=max(1, len(blob)))
    u.feed(blob)
    out, pos = [], 0
    for _ in range(count):
        u.skip()
        out.append(blob[pos:u.tell()])
        pos = u.tell()
    assert pos == len(blob), f"{len(blob) - pos} bytes after the {count} envelopes"
    return out


class DataSub:
    """A subscriber's data connection to a publisher's ``pubsub`` ROUTER: a ROUTER whose
    ``CONNECT_ROUTING_ID`` is the publisher's raw 16-byte id + a 4-byte connection number."""

    _conn_no = 0

    def __init__(self, endpoint: str, publisher: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        DataSub._conn_no += 1
        self.rid = bytes.fromhex(publisher) + struct.pack("!I", DataSub._conn_no)
        self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, self.rid)
        self.sock.connect(endpoint)

    def send_raw(self, frames: list[bytes], timeout: float = 5.0) -> None:
        """Send ``frames`` on the connection, retrying EHOSTUNREACH until it is up."""
        def sent() -> bool:
            try:
                self.sock.send_multipart([self.rid, *frames])
                return True
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                return False

        assert poll_until(sent, timeout), "the publisher's data connection never came up"

    def subscribe(self, topic: str, op: int = 1, prefix: bool = False,
                  packed: bool = False) -> None:
        """A subscription request: ``[version 1, op, flags, 0]``, topic (``packed``: ask for
        packed DATA, pub/sub 2.4)."""
        flags = (SUB_PREFIX if prefix else 0) | (SUB_PACKED if packed else 0)
        self.send_raw([bytes([1, op, flags, 0]), topic.encode()])

    def recv(self, timeout: float = 5.0, pings: bool = False) -> DataMsg:
        """The next message (PINGs skipped unless ``pings``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000))):
                break
            frames = self.sock.recv_multipart()
            assert frames[0] == self.rid, "a message on a connection we did not make"
            msg = DataMsg(frames[1:])
            if msg.kind != PING or pings:
                return msg
        raise TimeoutError(f"no data message within {timeout} s")

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)


class DataPub:
    """A publisher's data socket: a bound ROUTER (``ROUTER_MANDATORY``) announced under the
    role ``pubsub``; it learns subscriber connections from their subscription requests."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def requests(self, timeout: float) -> list[tuple[bytes, bytes, bytes]]:
        """The subscription requests read within ``timeout``: (routing id, 4-byte request
        frame, topic)."""
        out = []
        while self.sock.poll(max(1, int(timeout * 1000))):
            frames = self.sock.recv_multipart()
            assert len(frames) == 3, f"a subscription request is 2 frames, got {frames!r}"
            out.append((frames[0], frames[1], frames[2]))
            timeout = 0
        return out

    def send(self, rid: bytes, frames: list[bytes]) -> None:
        """Send one message to the connection ``rid``."""
        self.sock.send_multipart([rid, *frames])

    def data(self, rid: bytes, stream: str, epoch: int, seq: int, envs: list[bytes],
             packed: bool = False) -> None:
        """A DATA message of ``envs`` (seqs ``seq`` ..); ``packed``: in one frame (2.4)."""
        if packed:
            self.send(rid, [stream.encode(), data_header(DATA, self.node_id, epoch, seq,
                                                         len(envs), DURABLE | PACKED),
                            b"".join(envs)])
            return
        self.send(rid, [stream.encode(), data_header(DATA, self.node_id, epoch, seq,
                                                     len(envs)), *envs])

    def refuse(self, rid: bytes, topic: bytes, reason: int) -> None:
        """A REFUSED notice for the subscription request of ``topic`` (reason 3: malformed,
        what a pub/sub 2.3 publisher answers a request with the packed flag)."""
        self.send(rid, [topic, data_header(REFUSED, self.node_id, 0, 0, reason, flags=0)])

    def heartbeat(self, rid: bytes, stream: str, epoch: int, head: int) -> None:
        """A HEARTBEAT announcing ``head``."""
        self.send(rid, [stream.encode(), data_header(HEARTBEAT, self.node_id, epoch, head, 0)])

    def ping(self, rid: bytes) -> None:
        """A PING (empty topic, kind 4, our id, everything else 0)."""
        self.send(rid, [b"", data_header(PING, self.node_id, 0, 0, 0, flags=0)])

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)
