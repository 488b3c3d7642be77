"""Commit means handled: recv_batch, AsyncSubscriber exits and cancellation, a
subscriber used from two threads, stats while a consumer waits, and undecodable events.

Real nodes on 127.0.0.1 (mdns off, static peers), real sockets and cursor files; a restart
is a new Subscriber on the same data dir.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh.envelope import Event, encode
from mesh.errors import WrongThread
from mesh.metrics import render_prometheus
from mesh.node import Node
from patterns.pubsub import frames
from patterns.pubsub.aio import AsyncSubscriber
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Batch, Start, Subscriber
from tests.raw_pubsub import RawPublisher
from tests.util import make_node, unique, wait_until


class Boom(Exception):
    pass




def first_data(b: Node, stream: str, durable: str) -> Any:
    """A restart: a new durable subscriber on the same data dir; the first event's data."""
    with Subscriber(b, stream, durable=durable) as sub:
        ev = sub.recv(timeout=5)
        assert ev is not None
        return ev.data


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# --- 1. recv_batch: commit means handled -----------------------------------------------------

def test_recv_batch_handler_failing_on_4th_event_resumes_at_4th(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("rb")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(10))
        sizes: list[int] = []
        with pytest.raises(Boom), Subscriber(b, stream, durable="agg") as sub:
            while True:
                batch = sub.recv_batch(timeout=5)
                assert isinstance(batch, Batch)
                sizes.append(len(batch))
                for ev in batch:
                    if ev.data == 3:
                        raise Boom
        assert max(sizes) > 1  # a real batch, not one event per call
        assert first_data(b, stream, "agg") == 3


def test_recv_batch_not_iterated_counts_processed_at_next_call(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("rb")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(10))
        with Subscriber(b, stream, durable="agg", auto_commit=False) as sub:
            got: list[int] = []
            batch = sub.recv_batch(timeout=5)
            got.extend(batch[i].data for i in range(len(batch)))  # indexed, not iterated
            while len(got) < 10:
                more = sub.recv_batch(timeout=5)
                got.extend(more[i].data for i in range(len(more)))
            assert got == list(range(10))
            sub.commit()  # the owner's commit: every batch handed out was processed
        assert Subscriber(b, stream, durable="agg").positions()[(a.id, stream)] == 10


def test_commit_while_iterating_a_batch_commits_up_to_the_current_event(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("rb")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(10))
        with Subscriber(b, stream, durable="agg", auto_commit=False) as sub:
            seen = 0
            while seen < 6:
                batch = sub.recv_batch(timeout=5)
                for ev in batch:
                    seen += 1
                    if ev.data == 2:
                        assert batch[-1].data > 2  # events after it in the same batch
                        sub.commit()  # past 0..2, not past the events still to come
                        assert sub.positions()[(a.id, stream)] == 3
                    if ev.data == 5:
                        break
            sub.commit()  # break left the loop on 5: it was handed out (and handled)
            assert sub.positions()[(a.id, stream)] == 6


# --- 2. AsyncSubscriber -------------------------------------------------------------------------

def test_async_with_left_by_exception_does_not_commit_the_failing_event(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("aw")

    async def consume() -> None:
        async with AsyncSubscriber(b, stream, durable="agg") as sub:
            async for ev in sub:
                if ev.data == 3:
                    raise Boom

    with Publisher(a, stream) as pub:
        pub.publish_many(range(10))
        with pytest.raises(Boom):
            asyncio.run(consume())
        assert first_data(b, stream, "agg") == 3


def test_async_recv_cancelled_by_wait_for_loses_nothing(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("ac")
    n = 300
    got: list[int] = []

    async def consume() -> int:
        timeouts = 0
        sub = AsyncSubscriber(b, stream, durable="agg", batch=50)
        try:
            deadline = time.monotonic() + 20
            while len(got) < n and time.monotonic() < deadline:
                try:
                    ev = await asyncio.wait_for(sub.recv(), 0.05)
                except TimeoutError:
                    timeouts += 1
                    cancelled.set()
                    continue
                assert ev is not None
                got.append(ev.data)
        finally:
            await sub.aclose()
        return timeouts

    # Paced by the consumer: after every 30 events the producer waits until a receive has
    # been cancelled by wait_for (so cancellations really land between events).
    cancelled = threading.Event()

    with Publisher(a, stream) as pub:
        def produce() -> None:
            for i in range(n):
                pub.publish(i)
                if i % 30 == 29:
                    cancelled.clear()
                    cancelled.wait(5)

        t = threading.Thread(target=produce)
        t.start()
        timeouts = asyncio.run(consume())
        t.join()
        assert timeouts > 0  # cancellation really happened
        assert got == list(range(n))
        with Subscriber(b, stream, durable="agg") as sub:
            assert sub.positions()[(a.id, stream)] == n  # the durable cursor, after restart


# --- 3. threads ---------------------------------------------------------------------------------

def test_second_thread_receiving_is_refused_and_commit_keeps_owners_event(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("th")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(5))
        with Subscriber(b, stream, durable="agg", auto_commit=False) as sub:
            ev = sub.recv(timeout=5)  # the owner (this thread) handles event 0 now
            assert ev is not None and ev.data == 0
            t, out = in_thread(lambda: sub.recv(timeout=1))
            t.join(5)
            assert len(out) == 1 and isinstance(out[0], WrongThread)
            t, out = in_thread(lambda: list(sub.recv_batch(timeout=1)))
            t.join(5)
            assert isinstance(out[0], WrongThread)
            # Another thread's commit never commits the owner's unhandled event.
            t, out = in_thread(sub.commit)
            t.join(5)
            assert out == [None]
            assert sub.positions().get((a.id, stream), 0) == 0
            nxt = sub.recv(timeout=5)  # asking for the next: event 0 was handled
            assert nxt is not None and nxt.data == 1
            sub.commit()
            assert sub.positions()[(a.id, stream)] == 2


# --- 4. stats never wait on a consumer ----------------------------------------------------------

def blocked(sub: Subscriber) -> bool:
    """The consumer thread is inside its blocking receive (old code: holds the lock)."""
    pump = getattr(sub, "_pump_lock", None)
    if pump is not None:
        return bool(pump.locked())
    if sub._lock.acquire(blocking=False):
        sub._lock.release()
        return False
    return True


def test_stats_and_close_do_not_wait_on_a_thread_blocked_in_recv(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("st")
    with Publisher(a, stream) as pub:
        sub = Subscriber(b, stream, durable="agg")
        got: list[Event] = []
        consumer, _ = in_thread(lambda: [got.append(e) for e in sub])
        try:
            wait_until(lambda: blocked(sub), 5, what="consumer waiting in recv")
            for call in (sub.stats, sub.positions, b.stats, lambda: render_prometheus(b.metrics),
                         sub.commit):
                t0 = time.monotonic()
                t, out = in_thread(call)
                t.join(2)
                took = time.monotonic() - t0
                assert not t.is_alive() and not isinstance(out[0], BaseException), call
                assert took < 0.5, (call, took)
            t0 = time.monotonic()
            t, _ = in_thread(sub.close)
            t.join(2)
            assert not t.is_alive()
            consumer.join(2)
            assert not consumer.is_alive()  # `for event in sub` ended on close
            assert time.monotonic() - t0 < 1.0
        finally:
            if consumer.is_alive():  # old code: unblock the consumer so teardown can close
                pub.publish("unblock")
                consumer.join(5)
            sub.close()


# --- 5. undecodable events ----------------------------------------------------------------------

def test_undecodable_event_never_moves_the_cursor_over_earlier_events(
        tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    nd = make_node(tmp_path / "n", unique("ud"))
    raw = RawPublisher(zctx)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    stream = unique("ud")
    topic = stream.encode()
    fake = bytes(range(16))
    envs = [encode(Event(type="t", source="s", stream=stream, seq=0, data="e0")),
            b"\xc1not msgpack",  # seq 1: undecodable
            encode(Event(type="t", source="s", stream=stream, seq=2, data="e2"))]
    msg = frames.encode_data(topic, fake, 7, 0, envs, False)
    ep = f"tcp://127.0.0.1:{port}"
    try:
        # The handler fails on e0: nothing may be committed, e0 comes again.
        with pytest.raises(Boom), Subscriber(nd, stream, durable="u", endpoints=[ep]) as sub:
            holder: list[Event | None] = []
            wait_until(lambda: (raw.send_multipart(msg), holder.append(sub.recv(timeout=0.05)))
                       and holder[-1] is not None, 5, what="first event")
            assert holder[-1] is not None and holder[-1].data == "e0"
            assert sub.stats().bad_events >= 1  # seq 1 was already seen and refused
            raise Boom
        with Subscriber(nd, stream, durable="u", endpoints=[ep]) as sub:
            assert all(v == 0 for v in sub.positions().values()), sub.positions()
        # In order: once e0 is processed the cursor passes the skipped seq 1 with it.
        with pytest.raises(Boom), Subscriber(nd, stream, durable="u2", endpoints=[ep],
                        start=Start.beginning()) as sub:
            seen: list[Any] = []

            def step() -> bool:
                raw.send_multipart(msg)
                ev = sub.recv(timeout=0.05)
                if ev is not None:
                    seen.append(ev.data)
                return len(seen) >= 2

            wait_until(step, 5, what="both events")
            assert seen[:2] == ["e0", "e2"]
            raise Boom  # e0 was handled (e2 was asked for); e2 failed
        with Subscriber(nd, stream, durable="u2", endpoints=[ep]) as sub:
            assert set(sub.positions().values()) == {2}
    finally:
        raw.close(linger=0)
        nd.close()


# --- 6. a stream that goes quiet is committed (and acked) then, not at the next interval --------

def test_quiet_stream_is_acked_before_the_commit_interval(pair: tuple[Node, Node]) -> None:
    """A short-lived publisher (a one-shot `mesh pub`, a cron job) lingers until its durable
    subscribers ack. A subscriber whose stream went quiet commits what it handled within a few
    ticks instead of at ``commit_interval_s`` (60 s here), once per burst, not once per tick."""
    a, b = pair
    stream = unique("quiet")
    durable = unique("d")
    with Publisher(a, stream) as pub, Subscriber(b, stream, durable=durable,
                                                  commit_interval_s=60.0) as sub:
        pub.publish_many(range(3))
        got = [sub.recv(timeout=5) for _ in range(3)]
        assert [ev.data for ev in got if ev is not None] == [0, 1, 2]

        def acked() -> bool:
            sub.recv(timeout=0.05)  # the consumer waits for more: the third event is handled
            return pub.stats().lag.get(durable) == 0

        wait_until(acked, 10, what=lambda: f"lag {pub.stats().lag}, commits {sub.stats().commits}")
        commits = sub.stats().commits
        quiet_until = time.monotonic() + 1.0
        while time.monotonic() < quiet_until:  # ten ticks with nothing new
            assert sub.recv(timeout=0.1) is None
        assert sub.stats().commits == commits


def test_quiet_stream_is_acked_before_the_commit_interval_async(
        pair: tuple[Node, Node]) -> None:
    """The same through AsyncSubscriber: the event loop hands events out, the executor waits."""
    a, b = pair
    stream = unique("aquiet")
    durable = unique("d")

    async def main(pub: Publisher) -> None:
        async with AsyncSubscriber(b, stream, durable=durable, commit_interval_s=60.0) as sub:
            pub.publish_many(range(3))
            got = [await sub.recv(timeout=5) for _ in range(3)]
            assert [ev.data for ev in got if ev is not None] == [0, 1, 2]
            deadline = time.monotonic() + 10
            while pub.stats().lag.get(durable) != 0:
                assert time.monotonic() < deadline, f"lag {pub.stats().lag}"
                await sub.recv(timeout=0.05)  # the third event is handled: wait for more

    with Publisher(a, stream) as pub:
        asyncio.run(main(pub))
