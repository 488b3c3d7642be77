"""The reactor: cross-thread calls, timers, readers, failure isolation, clean stop."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import zmq

from mesh.errors import ClosedError, MeshTimeout
from mesh.reactor import Reactor
from tests.util import unique, wait_until


@pytest.fixture
def reactor(zctx: zmq.Context[Any]) -> Any:
    r = Reactor(zctx, name=unique("reactor"))
    r.start()
    yield r
    r.stop()


def test_call_soon_from_many_threads_runs_all_in_per_thread_order(reactor: Reactor) -> None:
    seen: list[tuple[int, int]] = []
    threads_seen: set[str] = set()

    def record(t: int, i: int) -> None:
        threads_seen.add(threading.current_thread().name)
        seen.append((t, i))

    def producer(t: int) -> None:
        for i in range(2000):
            reactor.call_soon(record, t, i)

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    reactor.run_sync(lambda: None)
    assert len(seen) == 8 * 2000
    for t in range(8):
        assert [i for tt, i in seen if tt == t] == list(range(2000))
    assert threads_seen == {reactor.name}
    # Batching: far fewer loop turns than calls.
    assert reactor.turns < len(seen)


def test_timers_fire_in_deadline_order_and_cancel_works(reactor: Reactor) -> None:
    order: list[str] = []
    reactor.call_later(0.06, order.append, "c")
    reactor.call_later(0.02, order.append, "a")
    cancelled = reactor.call_later(0.03, order.append, "x")
    reactor.call_later(0.04, order.append, "b")
    cancelled.cancel()
    wait_until(lambda: len(order) == 3, 3)
    assert order == ["a", "b", "c"]


def test_call_every_repeats_until_cancelled(reactor: Reactor) -> None:
    ticks: list[int] = []
    timer = reactor.call_every(0.01, lambda: ticks.append(1))
    wait_until(lambda: len(ticks) >= 3, 3)
    timer.cancel()
    n = reactor.run_sync(lambda: len(ticks))
    reactor.run_sync(lambda: None)
    done = threading.Event()
    reactor.call_later(0.05, done.set)
    assert done.wait(3)
    assert len(ticks) <= n + 1  # at most one run already under way when cancelled


def test_raising_callback_is_logged_counted_and_loop_survives(
    reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="mesh.reactor"):
        reactor.call_soon(boom)
        reactor.call_later(0.001, boom)
        wait_until(lambda: reactor.errors == 2, 3)
    assert reactor.run_sync(lambda: 41 + 1) == 42
    assert "boom" in caplog.text


def test_run_sync_raises_what_fn_raised_and_runs_inline_on_reactor(reactor: Reactor) -> None:
    def fail() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        reactor.run_sync(fail)
    assert reactor.run_sync(lambda: reactor.run_sync(lambda: reactor.in_reactor_thread()))
    assert not reactor.in_reactor_thread()


def test_run_sync_times_out(reactor: Reactor) -> None:
    release = threading.Event()
    with pytest.raises(MeshTimeout):
        reactor.run_sync(release.wait, 5, timeout=0.05)
    release.set()


def test_reader_drains_socket_and_stop_closes_owned(zctx: zmq.Context[Any]) -> None:
    r = Reactor(zctx, name=unique("reactor"))
    r.start()
    addr = f"inproc://{unique()}"
    got: list[bytes] = []
    pull = zctx.socket(zmq.PULL)
    pull.bind(addr)

    def on_readable(sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                got.append(sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    r.run_sync(lambda: r.add_reader(pull, on_readable, own=True))
    push = zctx.socket(zmq.PUSH)
    push.connect(addr)
    for i in range(500):
        push.send(b"%d" % i)
    wait_until(lambda: len(got) == 500, 5)
    assert got[-1] == b"499"
    r.stop()
    assert pull.closed
    push.close()


def test_add_reader_off_thread_is_refused(reactor: Reactor, zctx: zmq.Context[Any]) -> None:
    s = zctx.socket(zmq.PULL)
    try:
        with pytest.raises(RuntimeError, match="reactor thread"):
            reactor.add_reader(s, lambda _s: None)
    finally:
        s.close()


def test_stop_runs_pending_calls_joins_thread_and_refuses_more(zctx: zmq.Context[Any]) -> None:
    r = Reactor(zctx, name=unique("reactor"))
    r.start()
    ran: list[int] = []
    for i in range(100):
        r.call_soon(ran.append, i)
    r.stop()
    assert ran == list(range(100))
    assert r.name not in [t.name for t in threading.enumerate()]
    with pytest.raises(ClosedError):
        r.call_soon(ran.append, 1)
    r.stop()  # idempotent


def test_stop_without_start_is_clean(zctx: zmq.Context[Any]) -> None:
    r = Reactor(zctx, name=unique("reactor"))
    r.stop()
    with pytest.raises(ClosedError):
        r.start()
