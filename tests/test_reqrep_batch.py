"""Request/reply BATCH (1.4): several requests or replies in one message, negotiated by ``rev``.

Real sockets: a real node and service, driven by a raw pyzmq ROUTER that writes the frames
itself (batches, malformed items, huge batches, a 1.3 caller), and the asyncio client with 64
calls in flight.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import ConfigError, ProtocolError
from mesh.node import Node
from patterns.reqrep import AsyncClient, Client, ClientConfig, Service, ServiceConfig
from patterns.reqrep import frames as fr
from tests.util import ctrl, make_node, unique, wait_until

_pack = msgpack.Packer(use_bin_type=True).pack


def _req(rid: str, service: str, body: bytes = b"x", ttl: int = 5000, rev: int = 4) -> bytes:
    """One compact REQUEST frame with this ``rev``."""
    return b"ZRR1\x01" + _pack([[rid, service, ttl, 0, 0, {}, rev], body])


def _batch(items: list[bytes]) -> bytes:
    return fr.batch_frame(fr.Command.REQUEST, items)


@contextmanager
def _peer(tmp_path: Path, handler: Any = None, **cfg: Any) -> Iterator[tuple[Service, Any]]:
    """A service on a real node and a raw ROUTER connected to it: yields (service, io) where
    ``io.send(frames)`` sends to the service and ``io.recv()`` returns the next message."""
    node = Node(data_dir=tmp_path / "n", name="n", mesh=unique("m"), interface="127.0.0.1",
                mdns=False)
    name = unique("svc")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        svc = Service(node, name, handler or (lambda r: r.payload), outcome_log=False, **cfg)
        ep = next(e for e in node.info().endpoints[f"rpc.{name}"] if e.startswith("tcp"))
        sock.connect(ep)
        rid = f"{node.id}/{name}".encode()

        class IO:
            service = name

            def send(self, frames: list[bytes]) -> None:
                sock.send_multipart([rid, *frames])

            def recv(self, timeout_ms: int = 5000) -> list[bytes]:
                assert sock.poll(timeout_ms), "no message from the service"
                return sock.recv_multipart()[1:]

        # a first request proves the connection (EHOSTUNREACH until the handshake is done)
        probe = _req("probe", name)
        wait_until(lambda: _try_send(sock, [rid, probe]), 5, what="routable")
        IO().recv()
        yield svc, IO()
    finally:
        sock.close(0)
        node.close()


def _try_send(sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    try:
        sock.send_multipart(frames)
        return True
    except zmq.ZMQError:
        return False


def _replies(io: Any, n: int) -> tuple[dict[str, fr.Reply], int]:
    """The next ``n`` replies (single or batched), by id, and how many BATCHes carried them."""
    got: dict[str, fr.Reply] = {}
    batches = 0
    seen = 0
    while seen < n:
        m = fr.decode(io.recv())
        items = m.items if isinstance(m, fr.Batch) else [m]
        batches += isinstance(m, fr.Batch)
        for it in items:
            assert isinstance(it, fr.Reply)
            got[it.id] = it
            seen += 1
    return got, batches


def test_a_batch_of_requests_is_answered_and_the_replies_batched(tmp_path: Path) -> None:
    with _peer(tmp_path, inline=True) as (svc, io):
        io.send([_batch([_req(f"r{i}", io.service, bytes([i])) for i in range(10)])])
        got, batches = _replies(io, 10)
        assert {k: (v.status, v.body) for k, v in got.items()} == {
            f"r{i}": (fr.Status.OK, bytes([i])) for i in range(10)}
        # inline: all ten replies are ready in one pass of the I/O loop, so one BATCH
        assert batches == 1
        st = svc.stats()
        assert st.batches_received == 1 and st.batches_sent == 1 and st.garbage == 0
        assert st.executed == 11  # with the probe


def test_every_request_rule_holds_for_each_item_of_a_batch(tmp_path: Path) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    def handler(r: Any) -> Any:
        with lock:
            runs.append(r.id)
        return r.payload

    with _peer(tmp_path, handler, concurrency=4) as (svc, io):
        s = io.service
        io.send([_batch([
            _req("a", s, b"1"), _req("a", s, b"1"),  # the same request twice: run once
            _req("b", s, b"2", ttl=0),  # deadline already passed: EXPIRED, never run
            _req("c", s, b"3"), _req("c", s, b"other"),  # the id again, other payload
            _req("d", "not-" + s, b"4"),  # another service name
        ])])
        # a (the copy attaches to the running one, or, when the first copy ran at once on the
        # I/O thread, gets its cached reply), b, c, c-reused, d
        replies: list[fr.Reply] = []
        while len(replies) < 5 + svc.stats().cache_hits:  # a cache hit is answered too
            m = fr.decode(io.recv())
            for it in m.items if isinstance(m, fr.Batch) else [m]:
                assert isinstance(it, fr.Reply)
                replies.append(it)
        by: dict[str, list[tuple[fr.Status, bytes, str]]] = {}
        for r in replies:
            by.setdefault(r.id, []).append((r.status, r.body, r.error_type))
        assert by["a"] in ([(fr.Status.OK, b"1", "")], [(fr.Status.OK, b"1", "")] * 2)
        assert by["b"] == [(fr.Status.EXPIRED, b"", "")]
        assert sorted(by["c"]) == sorted([(fr.Status.OK, b"3", ""),
                                          (fr.Status.ERROR, b"", fr.ERR_ID_REUSED)])
        assert by["d"] == [(fr.Status.UNKNOWN_SERVICE, b"", "")]
        # a retry of a and c, batched, comes from the reply cache: nothing runs again
        io.send([_batch([_req("a", s, b"1"), _req("c", s, b"3")])])
        got, _ = _replies(io, 2)
        assert (got["a"].body, got["c"].body) == (b"1", b"3")
        assert sorted(runs) == ["a", "c", "probe"]
        st = svc.stats()
        assert st.cache_hits >= 2 and st.id_reused == 1 and st.expired == 1


def test_a_malformed_item_drops_only_that_item(tmp_path: Path) -> None:
    with _peer(tmp_path, inline=True) as (svc, io):
        s = io.service
        bad_meta = b"ZRR1\x01" + _pack([["", s, 1000, 0, 0, {}], b"x"])  # empty id
        bad_body = b"ZRR1\x01" + _pack([["e", s, 1000, 0, 0, {}], "not bin"])
        io.send([_batch([_req("ok1", s), bad_meta, bad_body, _req("ok2", s)])])
        got, _ = _replies(io, 2)
        assert set(got) == {"ok1", "ok2"}
        wait_until(lambda: svc.stats().garbage == 2, 5, what=svc.stats)
        # malformed as a whole: counted once each, nothing answered, the service serves on
        whole = [
            [b"ZRR1\x05" + b"\xc1"],  # not msgpack
            [b"ZRR1\x05" + _pack([3, [[["z", s, 1000, 0, 0, {}], b"x"]], 4])],  # PING batch
            [b"ZRR1\x05" + _pack([1, [], 4])],  # no items
            [b"ZRR1\x05" + _pack([1, [[["z", s, 1000, 0, 0, {}], b"x"]] * 1025, 4])],
            [b"ZRR1\x05", _pack([1, [], 4])],  # not one frame
        ]
        for frames in whole:
            io.send(frames)
        io.send([_req("after", s)])
        got, _ = _replies(io, 1)
        assert set(got) == {"after"}
        st = svc.stats()
        assert st.garbage == 2 + len(whole) and st.executed == 4


def test_a_huge_batch_cannot_make_the_service_hold_more_than_its_budget(tmp_path: Path) -> None:
    gate = threading.Event()

    def handler(r: Any) -> Any:
        if r.id != "probe":
            gate.wait(10)
        return r.payload

    with _peer(tmp_path, handler, concurrency=1, max_queue=5) as (svc, io):
        s = io.service
        items = [_req(f"h{i}", s) for i in range(fr.MAX_BATCH)]
        io.send([_batch(items)])
        got, _ = _replies(io, fr.MAX_BATCH - 6)  # everything beyond 1 running + 5 queued
        assert {r.status for r in got.values()} == {fr.Status.BUSY}
        st = svc.stats()
        assert st.running == 6 and st.busy == fr.MAX_BATCH - 6
        gate.set()
        done, _ = _replies(io, 6)
        assert {r.status for r in done.values()} == {fr.Status.OK}
        assert set(done) == {f"h{i}" for i in range(6)}


def _service_has_input(svc: Service) -> bool:
    # the I/O thread is inside the (inline) handler and does not touch its socket meanwhile
    return bool(svc._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)


@pytest.mark.parametrize("rev", [3, 4])
def test_only_a_caller_showing_rev_4_gets_batches(tmp_path: Path, rev: int) -> None:
    gates: dict[str, threading.Event] = {}

    def handler(r: Any) -> Any:
        if r.id in gates:
            gates[r.id].wait(10)
        return r.payload

    with _peer(tmp_path, handler, inline=True) as (svc, io):
        s = io.service
        seen = []
        # Three tries: the queued requests reach the service's queue over tcp at their own
        # pace, so on a loaded machine one try may see them trickle in one pass at a time
        # (rev 4 is the control that this scenario does batch; rev 3 must never).
        for attempt in range(3):
            blocker = f"blocker-{attempt}"
            gates[blocker] = threading.Event()
            io.send([_req(blocker, s, rev=rev)])  # holds the I/O thread: the rest queue up
            for i in range(9):
                io.send([_req(f"q{attempt}-{i}", s, rev=rev)])
            wait_until(lambda: _service_has_input(svc), 5, what="queued requests")
            gates[blocker].set()
            got, batches = _replies(io, 10)
            assert len(got) == 10
            seen.append(batches)
            if rev >= fr.BATCH_REVISION and batches:
                break
        if rev < fr.BATCH_REVISION:
            assert seen == [0, 0, 0] and svc.stats().batches_sent == 0  # a 1.3 caller: none
        else:
            assert seen[-1] >= 1


def test_the_async_client_batches_requests_with_64_in_flight(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    name = unique("svc")
    try:
        svc = Service(a, name, lambda r: r.payload, concurrency=4, outcome_log=False)
        wait_until(lambda: b.who_offers("service", name), 10, what="offer seen")

        async def run() -> tuple[list[Any], Any]:
            ac = AsyncClient(b)
            out: list[Any] = []

            async def worker(w: int) -> None:  # 64 in flight, each sending the next at once
                for k in range(10):
                    out.append(await ac.request(name, {"i": w * 10 + k}, timeout=20))

            try:
                await asyncio.gather(*(worker(w) for w in range(64)))
                return out, ac.stats()
            finally:
                ac.close()

        out, cst = asyncio.run(run())
        assert sorted(x["i"] for x in out) == list(range(640))
        sst = svc.stats()
        assert cst.batches_sent > 0 and sst.batches_received > 0
        assert sst.batches_sent > 0 and cst.batches_received > 0
        assert cst.replies == 640 and cst.garbage == 0 and sst.garbage == 0
        assert sst.executed == 640
    finally:
        b.close()
        a.close()


def _pair(tmp_path: Path) -> tuple[Node, Node]:
    mesh = unique("m")
    a = make_node(tmp_path / "a", mesh)
    b = make_node(tmp_path / "b", mesh, (ctrl(a),))
    wait_until(b.peers.list, 10, what="peer live")
    return a, b


def test_latency_mode_serves_and_refuses_bad_settings(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    name = unique("svc")
    try:
        with Service(a, name, lambda r: r.payload, inline=True, spin_us=300, outcome_log=False):
            wait_until(lambda: b.who_offers("service", name), 10, what="offer seen")
            with Client(b, spin_us=300) as c:
                assert [c.request(name, i, timeout=5) for i in range(50)] == list(range(50))
    finally:
        b.close()
        a.close()
    for bad in (-1, 2_000_000, 1.5):
        with pytest.raises(ConfigError):
            ClientConfig(spin_us=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            ServiceConfig(spin_us=bad)  # type: ignore[arg-type]


class _FakeResponder:
    """A responder written by hand on a real node: a ROUTER bound under ``rpc.NAME`` with the
    service routing id, offering NAME; ``answer`` sends what the test wants back."""

    def __init__(self, node: Node, name: str) -> None:
        self.sock = node.socket(zmq.ROUTER, f"rpc.{name}")
        self.sock.setsockopt(zmq.ROUTING_ID, f"{node.id}/{name}".encode())
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        node.bind(self.sock, f"rpc.{name}")
        node.offer("service", name)

    def next_request(self) -> tuple[bytes, fr.Request]:
        while True:
            assert self.sock.poll(10_000), "no request came"
            msg = self.sock.recv_multipart()
            m = fr.decode(msg[1:])
            if isinstance(m, fr.Request):
                return msg[0], m
            if isinstance(m, fr.Ping):  # keep the caller patient
                self.sock.send_multipart([msg[0], *fr.encode_pong(fr.Pong(
                    m.nonce, 1, m.request_id, fr.TaskState.RUNNING))])

    def answer(self, caller: bytes, req: fr.Request) -> None:
        """One BATCH: a reply for an id nobody waits for, a malformed item, the real reply."""
        late = fr.encode_reply(fr.Reply("nobody-waits", fr.Status.OK, 1, fr.Format.BYTES,
                                        body=b"?"))[0]
        bad = b"ZRR1\x02" + _pack([[req.id, 99, 1, 0, "", ""], b""])  # unknown status
        real = fr.encode_reply(fr.Reply(req.id, fr.Status.OK, 1, req.format,
                                        body=req.body))[0]
        self.sock.send_multipart([caller, fr.batch_frame(fr.Command.REPLY, [late, bad, real])])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_both_clients_read_a_batch_of_replies_item_by_item(tmp_path: Path, kind: str) -> None:
    a, b = _pair(tmp_path)
    name = unique("svc")
    try:
        fake = _FakeResponder(a, name)
        wait_until(lambda: b.who_offers("service", name), 10, what="offer seen")
        got: list[Any] = []

        def respond() -> None:
            caller, req = fake.next_request()
            fake.answer(caller, req)

        t = threading.Thread(target=respond, daemon=True)
        t.start()
        if kind == "sync":
            with Client(b) as c:
                got.append(c.request(name, b"payload", timeout=10))
                st = c.stats()
        else:
            async def run() -> Any:
                ac = AsyncClient(b)
                try:
                    got.append(await ac.request(name, b"payload", timeout=10))
                    return ac.stats()
                finally:
                    ac.close()
            st = asyncio.run(run())
        t.join(10)
        assert got == [b"payload"]
        assert st.batches_received == 1 and st.garbage == 1 and st.late_replies == 1
    finally:
        fake.sock.close(0)
        b.close()
        a.close()


def _thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def test_latency_mode_spins_only_a_bounded_time_after_each_message(tmp_path: Path) -> None:
    with _peer(tmp_path, inline=True, spin_us=20_000) as (svc, io):
        tid = svc._io.native_id
        assert tid is not None
        for i in range(20):  # each message is followed by at most 20 ms of spinning
            io.send([_req(f"s{i}", io.service)])
            _replies(io, 1)
        state = {"cpu": _thread_cpu_s(tid), "since": time.monotonic()}

        def settled() -> bool:  # the I/O thread's CPU time stopped growing for 0.3 s
            cpu, now = _thread_cpu_s(tid), time.monotonic()
            if cpu != state["cpu"]:
                state["cpu"], state["since"] = cpu, now
                return False
            return now - state["since"] >= 0.3

        # an unbounded spin keeps the thread's CPU time growing: this never settles
        wait_until(settled, 10, what=lambda: f"I/O thread CPU still growing: {state}")


# -- hostile bytes: a BATCH decoder raises only ProtocolError, never anything else -----------

_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
         | st.text(max_size=20) | st.binary(max_size=20))
_values = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=5)
                       | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=25)
_VALID_BATCH = fr.batch_frame(fr.Command.REQUEST, [_req("a", "s"), _req("b", "s", b"yo")])


@st.composite
def _hostile_batch(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):  # any msgpack shape after the BATCH head
        return b"ZRR1\x05" + _pack(draw(_values))
    buf = bytearray(_VALID_BATCH)  # or a valid BATCH with bytes flipped, cut or extended
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(5, len(buf) - 1))
        buf[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        buf = buf[: draw(st.integers(5, len(buf)))]
    return bytes(buf)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(_hostile_batch())
def test_a_hostile_batch_raises_only_protocol_errors(frame: bytes) -> None:
    try:
        m, rev = fr.decode_rev([frame])
    except ProtocolError:
        return
    assert isinstance(rev, int) and rev >= 0
    if isinstance(m, fr.Batch):
        assert 0 < len(m.items) + m.malformed <= fr.MAX_BATCH
    assert isinstance(fr.revision([frame]), int)
