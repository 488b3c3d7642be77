"""The default service's fast path under a burst: the requests of a BATCH (or several waiting
on the socket) run on the thread that owns the socket, one after another, while the loop pass
has spent less than ``inline_budget_s`` on them; their replies leave batched. Real node, real
sockets, a raw pyzmq ROUTER writing the frames.

What each test guards:
- a BATCH to an idle default service runs on the socket thread, answered in one BATCH (old
  code: every item went to a worker and back);
- the pass keeps to its budget: after it, the rest of the burst goes to the workers;
- a takeover in the middle of a BATCH: the rest of that BATCH is handled by the new leader
  while the slow item still runs, each item runs once, and every item is answered.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from patterns.reqrep import frames as fr
from tests.test_reqrep_batch import _batch, _peer, _replies, _req
from tests.util import wait_until


def test_a_batch_to_an_idle_default_service_runs_on_the_socket_thread(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(r: Any) -> Any:
        seen.append(threading.current_thread().name)
        return r.payload

    with _peer(tmp_path, handler, concurrency=4) as (svc, io):
        io_thread = f"rpc-{io.service}"
        seen.clear()  # the probe
        io.send([_batch([_req(f"r{i}", io.service, bytes([i])) for i in range(10)])])
        got, batches = _replies(io, 10)
        assert {k: (v.status, v.body) for k, v in got.items()} == {
            f"r{i}": (fr.Status.OK, bytes([i])) for i in range(10)}
        # old code: each item went to a worker (rpc-<name>-<i>) and its reply back through
        # the pipe; now the socket thread runs them in turn and answers in one BATCH
        assert seen == [io_thread] * 10
        assert batches == 1
        st = svc.stats()
        assert st.fast_path == 11 and st.takeovers == 0 and st.executed == 11


def test_a_burst_runs_on_the_socket_thread_only_within_the_budget(tmp_path: Path) -> None:
    seen: list[str] = []
    hold = threading.Event()  # never set: each call waits 8 ms (a handler doing I/O)

    def handler(r: Any) -> Any:
        seen.append(threading.current_thread().name)
        if r.id != "probe":
            hold.wait(0.008)
        return r.payload

    with _peer(tmp_path, handler, concurrency=4, inline_budget_s=0.02) as (svc, io):
        io_thread = f"rpc-{io.service}"
        seen.clear()
        io.send([_batch([_req(f"r{i}", io.service) for i in range(10)])])
        got, _ = _replies(io, 10)
        assert {v.status for v in got.values()} == {fr.Status.OK} and len(got) == 10
        inline = seen.count(io_thread)
        # the pass runs items here while it has spent < 20 ms: at most 3 of 8 ms (a 4th
        # starts at >= 24 ms); the rest went to the workers, which took them in parallel
        assert 1 <= inline <= 3, seen
        assert len(seen) == 10 and svc.stats().takeovers == 0


def test_a_takeover_mid_batch_hands_the_rest_of_it_to_the_new_leader(tmp_path: Path) -> None:
    release = threading.Event()
    runs: list[str] = []
    lock = threading.Lock()

    def handler(r: Any) -> Any:
        with lock:
            runs.append(r.id)
        if r.id == "slow":
            release.wait(20)
        return r.payload

    with _peer(tmp_path, handler, concurrency=2) as (svc, io):
        s = io.service
        try:
            io.send([_batch([_req("slow", s, b"s")] +
                            [_req(f"r{i}", s, bytes([i])) for i in range(5)])])
            # "slow" ran on the socket thread and was taken over (2 ms budget); the five
            # items after it in the BATCH are answered while it still runs
            got, _ = _replies(io, 5)
            assert {k: v.body for k, v in got.items()} == {f"r{i}": bytes([i]) for i in range(5)}
            assert svc.stats().takeovers == 1
        finally:
            release.set()
        got, _ = _replies(io, 1)
        assert got["slow"].body == b"s"
        assert sorted(runs) == ["probe", "r0", "r1", "r2", "r3", "r4", "slow"]
        wait_until(lambda: svc.stats().executed == 7, 5, what=svc.stats)


def test_a_burst_item_past_its_deadline_is_expired_not_run(tmp_path: Path) -> None:
    runs: list[str] = []
    hold = threading.Event()  # never set

    def handler(r: Any) -> Any:
        runs.append(r.id)
        if r.id == "first":
            hold.wait(0.05)  # a handler doing 50 ms of I/O, within the 200 ms budget
        return r.payload

    with _peer(tmp_path, handler, concurrency=4, inline_budget_s=0.2) as (svc, io):
        s = io.service
        runs.clear()
        # "late" waits in the BATCH behind "first"; its 10 ms deadline passes meanwhile
        io.send([_batch([_req("first", s, b"1"), _req("late", s, b"2", ttl=10)])])
        got, _ = _replies(io, 2)
        assert got["first"].status == fr.Status.OK
        # as a worker would: a request taken after its deadline is answered EXPIRED unrun
        # (old code: the BATCH went to the workers and "late" ran at once on another one)
        assert got["late"].status == fr.Status.EXPIRED
        assert runs == ["first"]
        assert svc.stats().expired == 1
