"""Client-side bounds of request/reply: the balancer's in-flight count, durable
requests that outlast a round, and the durable client's pruning. Real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.node import Node
from patterns.reqrep import (
    AsyncClient,
    Client,
    DurableClient,
    Incoming,
    OutcomeUnknown,
    RequestTimeout,
    Service,
)
from patterns.reqrep import frames as fr
from patterns.reqrep.balancer import Balancer
from patterns.reqrep.call import Call, CallConfig, Ping, Send
from tests.test_reqrep_real import ctrl, make_node, responders
from tests.util import unique, wait_until


def test_timed_out_calls_release_the_balancer_and_the_responder_is_used_again(
        tmp_path: Path) -> None:
    mesh, name = unique("m"), unique("svc")
    hub = make_node(tmp_path / "hub", mesh)
    a = make_node(tmp_path / "a", mesh, ctrl(hub))
    gate = threading.Event()
    served: list[str] = []

    def slow(req: Incoming) -> object:
        gate.wait(10)
        served.append("a")
        return "a"

    def fast(req: Incoming) -> object:
        served.append("b")
        return "b"

    svc_a = Service(a, name, slow, concurrency=4)
    b: Node | None = None
    svc_b: Service | None = None
    client = Client(hub, heartbeat_s=0.05)
    try:
        responders(hub, name, 1)
        for _ in range(4):  # A's whole capacity: old code left 4 in flight forever
            with pytest.raises(RequestTimeout):
                client.request(name, b"x", timeout=0.3)
        bal = client.responders.balancers[name]
        assert bal.responders[a.id].inflight == 0
        gate.set()
        wait_until(lambda: served.count("a") == 4, 10, what="A drained")
        assert client.request(name, b"w", timeout=5) == "a"  # hears A's free slots again
        # a second responder with less capacity appears: the healthy A must still win
        b = make_node(tmp_path / "b", mesh, ctrl(hub))
        svc_b = Service(b, name, fast, concurrency=1)
        responders(hub, name, 2)
        wait_until(lambda: len(bal.responders) == 2, 10, what="client sees B")
        served.clear()
        # B, not heard from yet, scores as the best capacity heard (A's 4: a tie, random);
        # once B's first reply says free 1, A wins. A stuck in-flight count would score A
        # at 0 and lose every time.
        got = [client.request(name, f"y{i}".encode(), timeout=5) for i in range(3)]
        assert "a" in got[:2], got
        assert all(v.inflight == 0 for v in bal.responders.values())
    finally:
        gate.set()
        client.close()
        if svc_b is not None:
            svc_b.close()
        if b is not None:
            b.close()
        svc_a.close()
        a.close()
        hub.close()


def test_durable_request_longer_than_its_attempt_timeout_runs_once(tmp_path: Path) -> None:
    mesh, name = unique("m"), unique("svc")
    hub = make_node(tmp_path / "hub", mesh)
    nodes = [make_node(tmp_path / n, mesh, ctrl(hub)) for n in ("a", "b")]
    runs: dict[str, list[object]] = {"a": [], "b": []}
    lock = threading.Lock()

    def handler_of(who: str) -> Callable[[Incoming], object]:
        def handler(req: Incoming) -> object:
            with lock:
                runs[who].append(req.payload)
            time.sleep(1.0)  # longer than two rounds of attempt_timeout
            return req.payload

        return handler

    svcs = [Service(n, name, handler_of(w)) for n, w in zip(nodes, ("a", "b"), strict=True)]
    try:
        responders(hub, name, 2)
        with DurableClient(hub, attempt_timeout=0.4) as dc:
            ids = [dc.submit(name, i) for i in range(3)]
            assert [dc.result(rid, timeout=15) for rid in ids] == [0, 1, 2]
        with lock:
            assert sorted(runs["a"] + runs["b"]) == [0, 1, 2], runs  # each ran exactly once
    finally:
        for s in svcs:
            s.close()
        for n in nodes:
            n.close()
        hub.close()


def _log_bytes(node: Node) -> int:
    d = Path(node.data_dir) / "reqrep" / "titanic"
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def test_durable_outcomes_and_log_are_pruned_after_their_ttl(tmp_path: Path) -> None:
    mesh, name = unique("m"), unique("svc")
    hub = make_node(tmp_path / "hub", mesh)
    srv = make_node(tmp_path / "srv", mesh, ctrl(hub))
    gate = threading.Event()  # nothing is answered (so nothing pruned) until all are logged
    svc = Service(srv, name, lambda req: gate.wait(10) and len(req.payload))
    body = b"x" * 8192
    try:
        responders(hub, name, 1)
        with DurableClient(hub, outcome_ttl=0.5) as dc:
            ids = [dc.submit(name, body) for _ in range(60)]  # ~500 KB: more than one segment
            full = _log_bytes(hub)
            assert full > 400_000
            gate.set()
            assert [dc.result(rid, timeout=15) for rid in ids] == [8192] * 60
            wait_until(lambda: not list(dc._state.items("reqrep.titanic")), 10,
                       what="outcomes pruned")
            wait_until(lambda: _log_bytes(hub) < full / 2, 10, what="log trimmed")
            with pytest.raises(ConfigError):  # pruned: no longer known
                dc.result(ids[0])
            end = dc._log.next_offset
        with DurableClient(hub, outcome_ttl=0.5) as dc:
            # reopening starts at the stored floor: nothing below it is read again
            assert dc._state.get("reqrep.titanic.meta", "floor") == end
            assert dc.pending() == []
            assert (dc._log.first_offset or 0) > 0
            rid = dc.submit(name, b"abc")  # and it still works
            assert dc.result(rid, timeout=10) == 3
    finally:
        svc.close()
        srv.close()
        hub.close()


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_call_extend_stays_with_the_responder_holding_it_even_when_another_scores_better(
        ) -> None:
    c = _Clock()
    bal = Balancer(c, rand=lambda: 0.0)
    bal.add("x")
    bal.add("y")
    bal.heard("x", free=1)
    call = Call("r1", "svc", 0.4, c.t, CallConfig(heartbeat_s=0.1))
    assert call.step(c.t, bal) == [Send("x", 0)]
    assert bal.responders["x"].inflight == 1
    bal.heard("y", free=8)  # y now looks far better
    running = fr.Pong(1, 0, call.id, fr.TaskState.RUNNING)  # x is full
    c.t += 0.4
    call.on_pong("x", running, c.t - 0.01, bal)
    assert call.step(c.t, bal) == [] and isinstance(call.error, RequestTimeout)
    assert bal.responders["x"].inflight == 0  # the round's end gave the slot back
    call.extend(c.t, 0.4, bal)
    assert call.step(c.t, bal) == [Ping("x")]  # asks x again, does not send to y
    assert bal.responders["x"].inflight == 1 and bal.responders["y"].inflight == 0
    call.release(bal)
    call.release(bal)  # idempotent
    assert bal.responders["x"].inflight == 0
    bal.remove("x")  # x left the mesh while it said RUNNING: the outcome is unknown
    call.extend(c.t, 0.4, bal)
    assert call.done and isinstance(call.error, OutcomeUnknown)
    assert bal.responders["y"].inflight == 0


def test_a_cancelled_async_call_releases_its_slot(tmp_path: Path) -> None:
    mesh, name = unique("m"), unique("svc")
    hub = make_node(tmp_path / "hub", mesh)
    srv = make_node(tmp_path / "srv", mesh, ctrl(hub))
    gate = threading.Event()
    svc = Service(srv, name, lambda req: gate.wait(10))

    async def main() -> None:
        client = AsyncClient(hub)
        try:
            task = asyncio.ensure_future(client.request(name, b"x", timeout=10))
            view = None
            deadline = time.monotonic() + 10
            while view is None or view.inflight != 1:
                assert time.monotonic() < deadline, "the call never started"
                await asyncio.sleep(0.01)
                bal = client.responders.balancers.get(name)
                view = bal.responders.get(srv.id) if bal is not None else None
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert view.inflight == 0
        finally:
            client.close()

    try:
        responders(hub, name, 1)
        asyncio.run(main())
    finally:
        gate.set()
        svc.close()
        srv.close()
        hub.close()


def test_a_call_of_a_responder_s_previous_life_does_not_release_a_slot_of_the_new_one() -> None:
    c = _Clock()
    bal = Balancer(c)
    bal.add("x")
    old = Call("r1", "svc", 5.0, c.t, CallConfig())
    assert old.step(c.t, bal) == [Send("x", 0)]
    bal.remove("x")  # left, and came back
    bal.add("x")
    new = Call("r2", "svc", 5.0, c.t, CallConfig())
    assert new.step(c.t, bal) == [Send("x", 0)]
    old.release(bal)
    assert bal.responders["x"].inflight == 1  # still r2's
    new.release(bal)
    assert bal.responders["x"].inflight == 0
