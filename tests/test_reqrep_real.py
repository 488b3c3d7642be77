"""Request/reply with real sockets and real processes (SIGKILL), static peers, no mDNS."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mesh.errors import MeshTimeout
from mesh.node import Node, PresenceConfig
from patterns.reqrep import (
    Client,
    Incoming,
    NoResponders,
    OutcomeUnknown,
    RemoteError,
    RequestTimeout,
    Service,
)
from tests.reqrep_child import CODE
from tests.util import python_child, unique, wait_until

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


def make_node(path: Path, mesh: str, peer: str | None = None) -> Node:
    node = Node(data_dir=path, name=path.name, mesh=mesh, interface="127.0.0.1", mdns=False,
                presence=PRESENCE, static_peers=(peer,) if peer else ())
    if peer:
        # offers made before the hub is live are not announced to it (core issue, reported)
        wait_until(node.peers.list, 10, what="hub live")
    return node


def ctrl(node: Node) -> str:
    return next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Node]:
    node = make_node(tmp_path / "hub", unique("m"))
    yield node
    node.close()


def start_child(tmp: Path, hub: Node, name: str, record: Path, *, concurrency: int = 4,
                delay_ms: int = 0, drop: int = 0, data: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    data = data or tmp / unique("svc")
    p = python_child(CODE, str(data), hub.mesh, ctrl(hub), name, str(record), str(concurrency),
                     str(delay_ms), str(drop), stdout=subprocess.PIPE, env=env)
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    assert line.startswith("READY "), line
    return p


def kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(10)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def responders(hub: Node, name: str, n: int) -> None:
    wait_until(lambda: len(hub.who_offers("service", name)) >= n, 10, what=f"{n} responders")


def test_sigkill_one_of_two_responders_under_load_every_request_completes_once(
        tmp_path: Path, hub: Node) -> None:
    name = unique("svc")
    rec_a, rec_b = tmp_path / "a.rec", tmp_path / "b.rec"
    data_a = tmp_path / "a"
    a = start_child(tmp_path, hub, name, rec_a, delay_ms=5, data=data_a)
    b = start_child(tmp_path, hub, name, rec_b, delay_ms=5)
    a2: subprocess.Popen[bytes] | None = None
    try:
        responders(hub, name, 2)
        client = Client(hub, heartbeat_s=0.1, liveness=3)
        timeout = 3.0
        done: list[tuple[str, float]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def load(k: int) -> None:
            i = 0
            while not stop.is_set():
                rid = f"{k}-{i}"
                i += 1
                t0 = time.monotonic()
                try:
                    assert client.request(name, rid, timeout=timeout, request_id=rid) == rid
                    done.append((rid, time.monotonic() - t0))
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(lines(rec_a)) >= 40 and len(lines(rec_b)) >= 40, 20,
                       what="both responders busy")
            kill(a)
            killed_at = len(done)
            wait_until(lambda: len(done) >= killed_at + 200, 20, what="load after the kill")
            # a restarted responder (same node id) is used again. Wait for the mesh to see A
            # gone first: a restart inside the gone interval can leave the hub with A's HELLO
            # but without its offer (node core issue, reported in the reqrep report).
            wait_until(lambda: len(hub.who_offers("service", name)) == 1, 10, what="A gone")
            a2 = start_child(tmp_path, hub, name, rec_a, delay_ms=5, data=data_a)
            after = len(lines(rec_a))
            wait_until(lambda: len(lines(rec_a)) >= after + 20, 20, what="restarted one used")
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        # Only the requests A held when it was killed fail, each with OutcomeUnknown (they may
        # have run): at most one per calling thread. None is run again on B.
        assert all(isinstance(e, OutcomeUnknown) for e in errors), errors[:3]
        assert len(errors) <= 4, errors
        assert all(elapsed < timeout for _, elapsed in done)
        started = lines(Path(f"{rec_a}.started")) + lines(Path(f"{rec_b}.started"))
        assert len(started) == len(set(started)), "a request started twice"
        assert len({rid for rid, _ in done}) == len(done)
        st = client.stats()
        assert st.replies == len(done)
        client.close()
    finally:
        kill(a)
        kill(b)
        if a2 is not None:
            kill(a2)


def test_dropped_reply_is_answered_from_the_cache_and_runs_once(
        tmp_path: Path, hub: Node) -> None:
    name = unique("svc")
    rec = tmp_path / "rec"
    p = start_child(tmp_path, hub, name, rec, concurrency=1, drop=1)
    try:
        responders(hub, name, 1)
        with Client(hub, heartbeat_s=0.05) as client:
            assert client.request(name, {"n": 1}, timeout=3.0, request_id="only-once") == {"n": 1}
            assert client.stats().retries >= 1
            assert client.request(name, b"second", timeout=3.0) == b"second"
        assert lines(rec) == ["only-once", lines(rec)[1]] and len(lines(rec)) == 2
    finally:
        kill(p)


def test_remote_exception_arrives_typed(tmp_path: Path, hub: Node) -> None:
    name = unique("svc")
    p = start_child(tmp_path, hub, name, tmp_path / "rec")
    try:
        responders(hub, name, 1)
        with Client(hub) as client, pytest.raises(RemoteError) as info:
            client.request(name, "boom", timeout=3.0)
        assert info.value.type == "KeyError" and "boom" in info.value.message
    finally:
        kill(p)


def test_no_responders_fails_at_the_deadline_not_later(hub: Node) -> None:
    with Client(hub) as client:
        for timeout in (0.3, 0.6):
            t0 = time.monotonic()
            with pytest.raises(NoResponders) as info:
                client.request(unique("nobody"), b"x", timeout=timeout)
            elapsed = time.monotonic() - t0
            assert timeout <= elapsed < timeout + 0.15, elapsed
            assert info.value.waited == timeout
        assert client.stats().no_responders == 2


def test_slow_handler_times_out_then_its_late_reply_is_counted(
        tmp_path: Path, hub: Node) -> None:
    name = unique("svc")
    gate = threading.Event()

    def slow(req: Incoming) -> object:
        if req.payload == "slow":
            gate.wait(5)
        return req.payload

    srv = make_node(tmp_path / "srv", hub.mesh, ctrl(hub))
    svc = Service(srv, name, slow, concurrency=2)
    try:
        responders(hub, name, 1)
        with Client(hub, heartbeat_s=0.05) as client:
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout) as info:
                client.request(name, "slow", timeout=0.4)
            assert 0.4 <= time.monotonic() - t0 < 0.55
            assert isinstance(info.value, MeshTimeout) and isinstance(info.value, TimeoutError)
            gate.set()
            wait_until(lambda: svc.stats().executed == 1, 5)
            assert client.request(name, "fast", timeout=2.0) == "fast"
            assert client.stats().late_replies == 1
            # the slow one was pinged while running, never re-executed
            assert svc.stats().executed == 2
    finally:
        svc.close()
        srv.close()


def test_garbage_frames_are_counted_and_ignored(tmp_path: Path, hub: Node) -> None:
    name = unique("svc")
    srv = make_node(tmp_path / "srv", hub.mesh, ctrl(hub))
    svc = Service(srv, name, lambda req: req.payload)
    raw = srv.context.socket(zmq.DEALER)
    try:
        raw.connect(next(e for e in svc.endpoints if e.startswith("tcp://")))
        junk = [[b"hello"], [b"ZRR1"], [b"ZRR1\x09", b"\x90"], [b"ZRR1\x01", b"\xc1", b""],
                [b"ZRR1\x01", b"\x96\x01\x02\x03\x04\x05\x06", b""],
                [b"ZRR1\x02", b"\x96\xa1x\x00\x00\x00\xa0\xa0", b""], [b"\xff" * 5000]]
        for frames in junk:
            raw.send_multipart(frames)
        wait_until(lambda: svc.stats().garbage == len(junk), 5, what="garbage counted")
        responders(hub, name, 1)
        with Client(hub) as client:
            assert client.request(name, [1, 2], timeout=3.0) == [1, 2]
    finally:
        raw.close(0)
        svc.close()
        srv.close()


def test_decorator_and_iterator_styles_and_headers(tmp_path: Path, hub: Node) -> None:
    deco, it = unique("deco"), unique("iter")
    srv = make_node(tmp_path / "srv", hub.mesh, ctrl(hub))
    svc1 = Service(srv, deco)

    @svc1.handler
    def echo_headers(req: Incoming) -> object:
        return dict(req.headers)

    svc2 = Service(srv, it, concurrency=2)

    def serve() -> None:
        for req in svc2.requests(timeout=5):
            req.reply({"doubled": req.payload * 2})

    server = threading.Thread(target=serve)
    server.start()
    try:
        responders(hub, it, 1)
        responders(hub, deco, 1)
        with Client(hub) as client:
            got = client.request(deco, None, timeout=3.0, correlationid="c-1",
                                 traceparent="00-ab-cd-01", headers={"x": "y"})
            assert got == {"correlationid": "c-1", "traceparent": "00-ab-cd-01", "x": "y"}
            assert client.request(it, 21, timeout=3.0) == {"doubled": 42}
    finally:
        svc1.close()
        svc2.close()
        server.join(10)
        srv.close()
