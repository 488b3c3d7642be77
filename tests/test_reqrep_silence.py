"""Silence is not death: a responder that is alive but quiet keeps the request it holds.

Real responder processes that hold the GIL, are SIGSTOPped, or are SIGKILLed mid-handler; the
caller counts how often each request started (the child appends the id to ``.started`` before
the handler runs). Presence here is slow (``gone_s`` 10 s, the default), as in a real deployment, so only a
real death (connection lost) or a real departure (presence LEFT) can move a request.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.node import Node, PresenceConfig
from patterns.reqrep import Client, OutcomeUnknown, RequestTimeout
from tests.test_reqrep_real import kill, lines, responders, start_child
from tests.util import unique, wait_until

SLOW_PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.5, gone_s=10.0)  # the default
CHILD_ENV = {"ZM_CHILD_GONE_S": "10.0"}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Node]:
    node = Node(data_dir=tmp_path / "hub", name="hub", mesh=unique("m"), interface="127.0.0.1",
                mdns=False, presence=SLOW_PRESENCE)
    yield node
    node.close()


def _two(tmp_path: Path, hub: Node, name: str, env: dict[str, str], delay_ms: int = 0,
         concurrency: int = 4) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    recs = [tmp_path / "a.rec", tmp_path / "b.rec"]
    kids = [start_child(tmp_path, hub, name, r, delay_ms=delay_ms, concurrency=concurrency,
                        env={**CHILD_ENV, **env}) for r in recs]
    responders(hub, name, 2)
    return kids, recs


def _started(recs: list[Path]) -> list[str]:
    return [rid for r in recs for rid in lines(Path(str(r) + ".started"))]


def test_a_handler_holding_the_gil_longer_than_liveness_runs_once(
        tmp_path: Path, hub: Node) -> None:
    # The handler holds the GIL 1.7 s, so its process answers no PING for 1.7 s; liveness is
    # 0.3 s. Before: every request failed over and ran on both responders.
    name = unique("svc")
    kids, recs = _two(tmp_path, hub, name, {"ZM_CHILD_GIL_MS": "1700"})
    try:
        client = Client(hub, heartbeat_s=0.1, liveness=3)
        got: dict[str, object] = {}

        def call(rid: str) -> None:
            try:
                got[rid] = client.request(name, rid, timeout=20.0, request_id=rid)
            except Exception as exc:
                got[rid] = exc

        threads = [threading.Thread(target=call, args=(f"r{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == {f"r{i}": f"r{i}" for i in range(3)}
        started = _started(recs)
        assert sorted(started) == ["r0", "r1", "r2"], started  # each ran exactly once
        assert client.stats().failovers == 0
        client.close()
    finally:
        for k in kids:
            kill(k)


def test_a_sigstopped_responder_keeps_its_request_and_answers_after_sigcont(
        tmp_path: Path, hub: Node) -> None:
    name = unique("svc")
    kids, recs = _two(tmp_path, hub, name, {}, delay_ms=300)
    stopped: subprocess.Popen[bytes] | None = None
    try:
        client = Client(hub, heartbeat_s=0.1, liveness=3)
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(
            client.request(name, "x", timeout=20.0, request_id="x")))
        t.start()
        wait_until(lambda: _started(recs), 10, what="the request started")
        stopped = kids[0] if lines(Path(str(recs[0]) + ".started")) else kids[1]
        stopped.send_signal(signal.SIGSTOP)
        holder = next(iter(hub.who_offers("service", name)))  # any id: we check both below
        bal = client.responders.balancers[name]
        wait_until(lambda: any(bal.is_silent(n) for n in bal.responders), 10,
                   what="the stopped responder marked silent")
        # Keep it stopped while the client pings it ten more times (old code had moved the
        # request to the other responder at the moment it marked the first one silent).
        sent = client.stats().bytes_out
        wait_until(lambda: client.stats().bytes_out >= sent + 10 * 40, 10, what="more pings")
        assert len(_started(recs)) == 1, _started(recs)
        stopped.send_signal(signal.SIGCONT)
        t.join(20)
        assert got == ["x"] and _started(recs) == ["x"] and holder
        assert client.stats().failovers == 0
        client.close()
    finally:
        if stopped is not None:
            stopped.send_signal(signal.SIGCONT)
        for k in kids:
            kill(k)


@pytest.mark.parametrize("retry_on_death", [False, True])
def test_a_responder_killed_mid_handler_is_outcome_unknown_or_retried_if_idempotent(
        tmp_path: Path, hub: Node, retry_on_death: bool) -> None:
    # Presence would take 10 s to call it gone; the request's deadline is 4 s: only the lost
    # connection (an unroutable PING) can end the call in time.
    name = unique("svc")
    kids, recs = _two(tmp_path, hub, name, {}, delay_ms=1500)
    try:
        client = Client(hub, heartbeat_s=0.1, liveness=3, retry_on_death=retry_on_death)
        got: list[object] = []

        def call() -> None:
            try:
                got.append(client.request(name, "k", timeout=4.0, request_id="k"))
            except Exception as exc:
                got.append(exc)

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: _started(recs), 10, what="the request started")
        victim = 0 if lines(Path(str(recs[0]) + ".started")) else 1
        wait_until(lambda: client.stats().bytes_in > 0, 10, what="a RUNNING pong")
        kill(kids[victim])
        t.join(10)
        assert len(got) == 1
        if retry_on_death:
            assert got == ["k"] and _started(recs) == ["k", "k"]
            assert client.stats().failovers == 1
        else:
            assert isinstance(got[0], OutcomeUnknown), got
            assert _started(recs) == ["k"]  # never run a second time
        client.close()
    finally:
        for k in kids:
            kill(k)


def test_a_retry_after_request_timeout_goes_back_to_the_responder_holding_the_id(
        tmp_path: Path, hub: Node) -> None:
    # One handler slot each: the holder advertises no free slot while it runs the request, so
    # a fresh choice picks the idle one and runs the request again there (before: it did).
    name = unique("svc")
    kids, recs = _two(tmp_path, hub, name, {}, delay_ms=1500, concurrency=1)
    try:
        client = Client(hub, heartbeat_s=0.1, liveness=3)
        with pytest.raises(RequestTimeout):
            client.request(name, "p", timeout=0.5, request_id="same")
        assert client.request(name, "p", timeout=10.0, request_id="same") == "p"
        assert _started(recs) == ["same"]
        client.close()
    finally:
        for k in kids:
            kill(k)
