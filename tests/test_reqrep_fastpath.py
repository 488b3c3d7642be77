"""The default service's fast path (``inline_budget_s``): a request that finds the service
idle runs on the thread that owns the socket, and a watchdog hands the socket to a worker when
the handler runs too long. Real nodes on 127.0.0.1, real sockets and threads.

What each test guards:
- the fast path is taken one request at a time (old code: every request went to a worker);
- a handler blocked on the fast path does not stall PINGs or other requests (the takeover);
- ``concurrency`` still bounds the handlers running at once across a takeover;
- a retry of a taken-over request's id attaches to it (one run, both answered);
- a GIL-bound handler (a tight pure-Python loop) on the fast path is a slow, alive peer;
- a handler slower than the budget goes to a worker the next time;
- threads stay bounded over many takeovers, and close() ends them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.node import Node
from patterns.reqrep import Client, Incoming, Service, ServiceConfig
from tests.test_reqrep_real import ctrl, make_node, responders
from tests.util import unique, wait_until


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    mesh = unique("m")
    hub = make_node(tmp_path / "hub", mesh)
    srv = make_node(tmp_path / "srv", mesh, ctrl(hub))
    yield hub, srv
    srv.close()
    hub.close()


def _threads_of(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"rpc-{name}")]


def test_one_request_at_a_time_runs_on_the_socket_thread(pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    seen: list[str] = []

    def handler(req: Incoming) -> object:
        seen.append(threading.current_thread().name)
        return req.payload

    with Service(srv, name, handler, concurrency=4, outcome_log=False) as svc, \
            Client(hub) as client:
        responders(hub, name, 1)
        for i in range(50):
            assert client.request(name, i, timeout=5) == i
        # old code: every one ran on a worker (rpc-<name>-<i>), two thread hand-offs each
        assert seen == [f"rpc-{name}"] * 50
        st = svc.stats()
        assert st.fast_path == 50 and st.takeovers == 0 and st.executed == 50


def test_fast_path_off_sends_every_request_to_a_worker(pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    seen: list[str] = []

    def handler(req: Incoming) -> object:
        seen.append(threading.current_thread().name)
        return req.payload

    with Service(srv, name, handler, inline_budget_s=0, outcome_log=False) as svc, \
            Client(hub) as client:
        responders(hub, name, 1)
        for i in range(10):
            assert client.request(name, i, timeout=5) == i
        assert all(n.startswith(f"rpc-{name}-") for n in seen), seen
        assert svc.stats().fast_path == 0


@pytest.mark.parametrize("bad", [-0.1, 11.0, "1", True, None])
def test_bad_budget_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError):
        ServiceConfig(inline_budget_s=bad)  # type: ignore[arg-type]


def test_blocked_fast_path_handler_does_not_stall_other_requests(
        pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    release = threading.Event()
    started = threading.Event()

    def handler(req: Incoming) -> object:
        if req.payload == "block":
            started.set()
            release.wait(20)
        return req.payload

    out: list[object] = []
    with Service(srv, name, handler, concurrency=2, outcome_log=False) as svc, \
            Client(hub, heartbeat_s=0.05) as client:
        responders(hub, name, 1)
        t = threading.Thread(target=lambda: out.append(client.request(name, "block",
                                                                      timeout=30)))
        t.start()
        try:
            assert started.wait(10)
            # Other requests and the PINGs of the blocked one are answered meanwhile: with
            # no takeover these requests would wait for it (and time out).
            for i in range(20):
                assert client.request(name, i, timeout=5) == i
            assert t.is_alive()
            st = svc.stats()
            assert st.fast_path == 1 and st.takeovers == 1  # the others found it busy
            pongs = svc.stats().pings
            wait_until(lambda: svc.stats().pings > pongs + 3, 5, what="PINGs answered")
        finally:
            release.set()
            t.join(20)
        assert out == ["block"]
        st = svc.stats()
        assert st.executed == 21 and st.running == 0


def test_takeover_keeps_the_concurrency_limit(pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    gate = threading.Event()
    lock = threading.Lock()
    running = [0]
    most = [0]

    def handler(req: Incoming) -> object:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if req.payload == 0:
                gate.wait(20)
            else:
                time.sleep(0.01)
            return req.payload
        finally:
            with lock:
                running[0] -= 1

    results: dict[int, object] = {}

    def call(i: int) -> None:
        results[i] = client.request(name, i, timeout=30)

    with Service(srv, name, handler, concurrency=1, outcome_log=False) as svc, \
            Client(hub) as client:
        responders(hub, name, 1)
        first = threading.Thread(target=call, args=(0,))
        first.start()
        wait_until(lambda: svc.stats().takeovers == 1, 10, what=svc.stats)
        others = [threading.Thread(target=call, args=(i,)) for i in range(1, 5)]
        for o in others:
            o.start()
        wait_until(lambda: svc.stats().received >= 5, 10, what=svc.stats)
        # concurrency=1: the taken-over handler is still running, so the rest wait for it
        assert running[0] == 1 and svc.stats().executed == 0
        gate.set()
        for th in [first, *others]:
            th.join(30)
        assert results == {i: i for i in range(5)}
        assert most[0] == 1


def test_retry_of_a_taken_over_request_attaches_and_runs_once(
        pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    gate = threading.Event()
    ran: list[object] = []

    def handler(req: Incoming) -> object:
        ran.append(req.payload)
        gate.wait(20)
        return ["done", req.payload]

    got: list[object] = []
    with Service(srv, name, handler, concurrency=2, outcome_log=False) as svc, \
            Client(hub) as client:
        responders(hub, name, 1)
        th = [threading.Thread(target=lambda: got.append(
            client.request(name, "p", timeout=30, request_id="same-id"))) for _ in range(2)]
        th[0].start()
        wait_until(lambda: svc.stats().takeovers == 1, 10, what=svc.stats)
        th[1].start()  # the same id and payload, from another socket: attaches
        wait_until(lambda: svc.stats().attached == 1, 10, what=svc.stats)
        gate.set()
        for t in th:
            t.join(30)
        assert ran == ["p"]
        assert got == [["done", "p"], ["done", "p"]]


def test_gil_bound_fast_path_handler_is_slow_not_dead(pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")

    def handler(req: Incoming) -> object:
        if req.payload == "spin":
            end = time.monotonic() + 1.5
            n = 0
            while time.monotonic() < end:  # holds the GIL but for the switch interval
                n += 1
            return "spun"
        return req.payload

    out: list[object] = []
    with Service(srv, name, handler, concurrency=2, outcome_log=False) as svc, \
            Client(hub, heartbeat_s=0.05) as client:
        responders(hub, name, 1)
        t = threading.Thread(target=lambda: out.append(client.request(name, "spin",
                                                                      timeout=30)))
        t.start()
        wait_until(lambda: svc.stats().takeovers == 1, 5, what=svc.stats)
        assert client.request(name, "quick", timeout=5) == "quick"
        t.join(30)
        assert out == ["spun"]


def test_a_slow_handler_goes_to_a_worker_next_time(pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    seen: list[str] = []

    def handler(req: Incoming) -> object:
        seen.append(threading.current_thread().name)
        if req.payload == "first":  # runs until the watchdog took the socket
            wait_until(lambda: svc.stats().takeovers == 1, 10, what=svc.stats)
        elif req.payload == "slow":
            time.sleep(0.05)
        return req.payload

    with Service(srv, name, handler, concurrency=2, outcome_log=False) as svc, \
            Client(hub) as client:
        responders(hub, name, 1)
        assert client.request(name, "first", timeout=15) == "first"  # fast path, taken over
        assert client.request(name, "slow", timeout=5) == "slow"  # its last run was slow
        assert svc.stats().fast_path == 1
        assert client.request(name, "x", timeout=5) == "x"  # the last run was slow: a worker
        assert client.request(name, "y", timeout=5) == "y"  # the last was fast: fast path
        assert svc.stats().fast_path == 2 and svc.stats().takeovers == 1


def test_threads_stay_bounded_over_takeovers_and_close_ends_them(
        pair: tuple[Node, Node]) -> None:
    hub, srv = pair
    name = unique("svc")
    concurrency = 3

    def handler(req: Incoming) -> object:  # each run lasts until it was taken over
        wait_until(lambda: svc.stats().takeovers > req.payload, 10, what=svc.stats)
        return req.payload

    svc = Service(srv, name, handler, concurrency=concurrency, outcome_log=False)
    try:
        with Client(hub) as client:
            responders(hub, name, 1)
            # the pool (one of them leading) and the watchdog
            assert len(_threads_of(name)) == concurrency + 2
            before = threading.active_count()
            for i in range(20):
                svc._last_s = 0.0  # make every call take the fast path (and be taken over)
                assert client.request(name, i, timeout=15) == i
            assert svc.stats().takeovers == 20 and svc.stats().fast_path == 20
            assert threading.active_count() == before
            assert len(_threads_of(name)) == concurrency + 2
    finally:
        svc.close()
    assert not [t for t in _threads_of(name) if t.is_alive()]
