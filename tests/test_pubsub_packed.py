"""Packed DATA messages (pub/sub 2.4): one frame holding every envelope of a message.

What is promised (docs/protocol.md, "Pub/sub protocol" 1): a subscriber asks for the layout
with the request flag ``PACKED``; a publisher that knows it sends that connection packed DATA,
any other connection one frame per envelope; a 2.3 publisher refuses the flag as malformed
and the subscriber asks again without it. A packed frame that does not hold exactly ``count``
msgpack values, or holds one over ``max_event_size``, is dropped and counted as the same
fault of the one-frame-per-envelope layout would be; one value that is not a valid envelope
is a typed ``undecodable`` gap at its seq. The store's follower sees every run, whichever
layout it came in.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh.envelope import Event, decode, encode, from_unpacked
from mesh.errors import CodecError, EventTooLarge, ProtocolError, UnsupportedVersion
from mesh.metrics import render_prometheus
from mesh.node import Node
from patterns.pubsub import frames
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, StreamGap, Subscriber
from tests.util import drain, make_node, unique, wait_until

PUB = bytes(range(16))


def _envs(stream: str, first: int, n: int, size: int = 10) -> list[bytes]:
    return [encode(Event(type="t", source="s", stream=stream, seq=first + i,
                         data=bytes([i % 256]) * size)) for i in range(n)]


# --- frames ------------------------------------------------------------------------------


def test_packed_message_round_trip() -> None:
    envs = _envs("a.b", 41, 5)
    msg = frames.encode_data(b"a.b", PUB, 7, 41, envs, True, packed=True)
    assert len(msg) == 3 and msg[2] == b"".join(envs)
    assert msg[1][2] == frames.FLAG_DURABLE | frames.FLAG_PACKED
    stream, head, run = frames.decode_message(msg, max_event_size=1000)
    assert stream == "a.b" and (head.seq, head.count, head.durable) == (41, 5, True)
    assert isinstance(run, frames.Packed) and len(run) == 5
    assert run.envelopes() == envs and frames.run_envelopes(run) == envs
    assert run.arrays is not None
    assert [from_unpacked(a) for a in run.arrays] == [decode(e) for e in envs]
    # one frame per envelope still decodes as before (a plain list)
    _, _, plain = frames.decode_message(frames.encode_data(b"a.b", PUB, 7, 41, envs, True),
                                        max_event_size=1000)
    assert plain == envs


def test_subscription_flag() -> None:
    req = frames.encode_subscribe(b"a.", prefix=True, packed=True)
    assert req[0] == bytes([1, 1, 3, 0])
    assert frames.decode_subscription(req) == (frames.OP_SUBSCRIBE, "a.", True, True)
    assert frames.decode_subscribe(req) == (frames.OP_SUBSCRIBE, "a.", True)
    assert frames.decode_subscription(frames.encode_subscribe(b"a", prefix=False))[3] is False
    with pytest.raises(ProtocolError):
        frames.decode_subscription([bytes([1, 1, 4, 0]), b"a"])  # an unknown flag bit


_ENV = _envs("s", 0, 1)[0]
_BIG = _envs("s", 0, 1, size=600)[0]


@pytest.mark.parametrize("count,blob,error", [
    (3, b"", ProtocolError),                        # nothing at all
    (2, _ENV, ProtocolError),                       # count says more than the frame holds
    (1, _ENV * 2, ProtocolError),                   # ... or fewer: trailing envelopes
    (1, _ENV + b"\x01", ProtocolError),             # trailing bytes
    (1, _ENV[:-1], ProtocolError),                  # a truncated envelope
    (1 << 31, _ENV, ProtocolError),                 # a huge count
    (200_000, b"\x01" * 200_000, ProtocolError),    # over max_batch
    (1, b"\xc1", ProtocolError),                    # not msgpack at all
    (1, b"\x91" * 5000 + b"\x01", ProtocolError),   # nested too deep to delimit
    (1, _BIG, EventTooLarge),                       # one envelope over max_event_size
    (2, _ENV + _BIG, EventTooLarge),
], ids=["empty", "fewer", "more", "trailing", "truncated", "huge-count", "max-batch",
        "not-msgpack", "too-deep", "oversize", "oversize-second"])
def test_malformed_packed_frames_are_typed(count: int, blob: bytes,
                                           error: type[Exception]) -> None:
    head = frames.HEADER.pack(1, frames.KIND_DATA, frames.FLAG_PACKED, PUB, 0, 0, count)
    with pytest.raises(error):
        frames.decode_message([b"s", head, blob], max_event_size=500)


def test_packed_flag_with_more_frames_or_on_a_heartbeat_is_refused() -> None:
    env = _envs("s", 0, 1)[0]
    head = frames.HEADER.pack(1, frames.KIND_DATA, frames.FLAG_PACKED, PUB, 0, 0, 2)
    with pytest.raises(ProtocolError):
        frames.decode_message([b"s", head, env, env], max_event_size=500)
    hb = frames.HEADER.pack(1, frames.KIND_HEARTBEAT, frames.FLAG_PACKED, PUB, 0, 3, 0)
    with pytest.raises(ProtocolError):
        frames.decode_message([b"s", hb], max_event_size=500)
    bad = frames.HEADER.pack(1, frames.KIND_DATA, frames.FLAG_PACKED | 0x04, PUB, 0, 0, 1)
    with pytest.raises(ProtocolError):
        frames.decode_message([b"s", bad, env], max_event_size=500)


def test_mutated_packed_frames_raise_only_typed_errors() -> None:
    rnd = random.Random(2024)
    envs = _envs("s", 0, 8, size=30)
    msg = frames.encode_data(b"s", PUB, 1, 0, envs, False, packed=True)
    for _ in range(3000):
        blob = bytearray(msg[2])
        for _ in range(rnd.randint(1, 4)):
            op = rnd.random()
            i = rnd.randrange(len(blob))
            if op < 0.5:
                blob[i] = rnd.randrange(256)
            elif op < 0.75:
                del blob[i:i + rnd.randint(1, 20)]
            else:
                blob[i:i] = rnd.randbytes(rnd.randint(1, 5))
        count = rnd.choice([8, 8, 8, 7, 9, 1, rnd.randrange(1, 1 << 32)])
        head = frames.HEADER.pack(1, frames.KIND_DATA, frames.FLAG_PACKED, PUB, 1, 0, count)
        try:
            _, _, run = frames.decode_message([b"s", head, bytes(blob)], max_event_size=200)
        except (ProtocolError, EventTooLarge, UnsupportedVersion):
            continue
        assert isinstance(run, frames.Packed) and len(run) == count
        assert b"".join(run.envelopes()) == bytes(blob)  # exactly the frame, cut in count
        for env in run.envelopes():
            try:
                decode(env, 200)
            except CodecError:
                pass


def test_a_bad_value_in_a_packed_frame_decodes_as_separate_frames_would() -> None:
    # Invalid UTF-8 in one envelope's string: msgpack refuses to unpack the frame in one
    # pass, so the frame is cut envelope by envelope: the others are fine.
    envs = _envs("s", 0, 3)
    arr = msgpack.unpackb(envs[1])
    bad = msgpack.packb(arr, use_bin_type=True).replace(b"\xa1t", b"\xa1\xff")
    assert bad != envs[1]
    msg = frames.encode_data(b"s", PUB, 1, 0, [envs[0], bad, envs[2]], False, packed=True)
    _, _, run = frames.decode_message(msg, max_event_size=500)
    assert isinstance(run, frames.Packed) and run.arrays is None
    assert run.envelopes() == [envs[0], bad, envs[2]]


# --- end to end ----------------------------------------------------------------------------


def _metric(text: str, name: str, stream: str) -> float | None:
    """The value of ``name`` for ``stream`` in a Prometheus text exposition, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{") and f'stream="{stream}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_zeromesh_pair_speaks_packed(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("pk")
    with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.beginning()) as sub:
        pub.publish(0)
        got = drain(sub, 1)  # may have come by replay, before the subscription reached `a`
        # What follows is live only once the publisher sends this stream to the connection:
        # events published before that are lost on the live path and replayed (a gap).
        wait_until(lambda: pub.stats().subscribers >= 1, timeout=10)
        for i in range(1, 3):
            pub.publish(i)
        pub.publish_many(range(3, 1003))
        got += drain(sub, 1002)
        assert [e.seq for e in got] == list(range(1003))
        assert [e.data for e in got] == list(range(1003))
        st = sub.stats()
        assert st.packed_messages >= 1 and st.unpacked_publishers == 0
        assert st.bad_frames == 0 and st.gaps == 0
        # The same counters on the node's metrics (what an operator sees on /metrics).
        text = render_prometheus(b)
        packed = _metric(text, "packed_messages_total", stream)
        assert packed is not None and packed >= 1, text
        assert _metric(text, "unpacked_publishers_total", stream) == 0


def test_old_subscriber_gets_one_frame_per_envelope(
        pair: tuple[Node, Node], zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # A raw 2.3 subscriber (its request has no PACKED flag) beside a 2.4 one asking for it:
    # each gets the layout it asked for, the same seqs.
    a, _b = pair
    stream = unique("old")
    with Publisher(a, stream, durable=False) as pub:
        ep = pub.endpoints[0]
        olds = zctx.socket(zmq.DEALER)
        news = zctx.socket(zmq.DEALER)
        try:
            for s, packed in ((olds, False), (news, True)):
                s.setsockopt(zmq.LINGER, 0)
                s.connect(ep)
                s.send_multipart(frames.encode_subscribe(stream.encode(), prefix=False,
                                                         packed=packed))
                assert s.poll(5000), "no heartbeat answering the subscription"
                _, h, _ = frames.decode_message(s.recv_multipart(), max_event_size=1 << 20)
                assert h.kind == frames.KIND_HEARTBEAT
            pub.publish_many(range(50))
            for s, packed in ((olds, False), (news, True)):
                seqs: list[int] = []
                while len(seqs) < 50:
                    assert s.poll(5000), f"no DATA (packed={packed})"
                    msg = s.recv_multipart()
                    _, h, run = frames.decode_message(msg, max_event_size=1 << 20)
                    if h.kind != frames.KIND_DATA:
                        continue
                    assert isinstance(run, frames.Packed) is packed
                    assert len(msg) == (3 if packed else 2 + h.count)
                    assert bool(msg[1][2] & frames.FLAG_PACKED) is packed
                    seqs += [decode(e).seq or 0 for e in frames.run_envelopes(run)]
                assert seqs == list(range(50))
        finally:
            olds.close(0)
            news.close(0)


def test_subscriber_falls_back_for_an_old_publisher(
        tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # A raw publisher that speaks 2.3: it refuses the PACKED flag (malformed, as a 2.3
    # decode_subscribe does) and sends one frame per envelope.
    node = make_node(tmp_path / "n", unique("fb"))
    raw = zctx.socket(zmq.ROUTER)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    stream = unique("fb")
    try:
        with Subscriber(node, stream, start=Start.beginning(),
                        endpoints=[f"tcp://127.0.0.1:{port}"]) as sub:
            requests: list[bytes] = []
            deadline = time.monotonic() + 10
            rid = b""
            while time.monotonic() < deadline and (not requests or requests[-1][2]):
                sub.recv(timeout=0.02)
                if raw.poll(20):
                    rid, req, topic = raw.recv_multipart()
                    requests.append(req)
                    if req[2] & frames.SUB_PACKED:
                        raw.send_multipart([rid, *frames.encode_refused(
                            topic, PUB, frames.REFUSED_MALFORMED)])
            assert [r[2] for r in requests[:2]] == [frames.SUB_PACKED, 0], requests
            raw.send_multipart([rid, *frames.encode_data(stream.encode(), PUB, 3, 0,
                                                         _envs(stream, 0, 4), True)])
            got = drain(sub, 4, timeout=5)
            assert [e.seq for e in got] == [0, 1, 2, 3]
            st = sub.stats()
            assert st.unpacked_publishers == 1 and st.subscriptions_refused == 0
            assert st.packed_messages == 0
            assert _metric(render_prometheus(node), "unpacked_publishers_total",
                           stream) == 1
    finally:
        raw.close(0)
        node.close()


def test_bad_packed_frames_from_a_publisher_are_counted_never_a_stall(
        tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    node = make_node(tmp_path / "n", unique("bp"))
    raw = zctx.socket(zmq.ROUTER)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    stream = unique("bp")
    topic = stream.encode()
    try:
        with Subscriber(node, stream, start=Start.beginning(), max_event_size=500,
                        endpoints=[f"tcp://127.0.0.1:{port}"]) as sub:
            assert raw.poll(5000), "no subscription request"
            rid = raw.recv_multipart()[0]
            envs = _envs(stream, 0, 6)
            arr = msgpack.unpackb(envs[4])
            arr[5] = "not a time"  # well-formed msgpack, not an envelope: undecodable
            envs[4] = msgpack.packb(arr, use_bin_type=True)

            def packed(first: int, blob: bytes, count: int) -> list[bytes]:
                head = frames.HEADER.pack(1, frames.KIND_DATA, frames.FLAG_PACKED, PUB, 9,
                                          first, count)
                return [rid, topic, head, blob]

            big = _envs(stream, 2, 1, size=600)[0]
            for m in (packed(0, b"".join(envs[0:2]), 3),           # count mismatch
                      packed(0, b"".join(envs[0:2]) + b"\x00", 2),  # trailing bytes
                      packed(0, envs[0][:-2], 1),                   # truncated
                      packed(0, envs[0], 1 << 30),                  # huge count
                      ):
                raw.send_multipart(m)
            raw.send_multipart(packed(0, b"".join(envs[0:2]), 2))   # fine: 0, 1
            raw.send_multipart(packed(2, big, 1))                   # oversize
            # best-effort: 2 is lost (skipped), 3..5 arrive with 4 undecodable
            raw.send_multipart(packed(3, b"".join(envs[3:6]), 3))
            got: list[Any] = []

            def arrived() -> bool:
                got.extend(sub.recv_batch(timeout=0.05))
                return len(got) >= 4
            wait_until(arrived, 5, what="the good events")
            assert [e.seq for e in got] == [0, 1, 3, 5]
            st = sub.stats()
            assert st.bad_frames == 4 and st.oversize == 1 and st.bad_events == 1
            gaps = sub.gaps()
            assert [(g.start, g.end, g.reason) for g in gaps
                    if isinstance(g, StreamGap)] == [(4, 5, "undecodable")]
    finally:
        raw.close(0)
        node.close()


class _Recording(Subscriber):
    """Records every run the one delivery hook sees (as the store's follower would)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.runs: list[tuple[int, int, bool, list[bytes]]] = []
        super().__init__(*args, **kwargs)

    def _on_run(self, key: Any, first: int, epoch: int, run: frames.Run) -> None:
        self.runs.append((first, epoch, isinstance(run, frames.Packed),
                          list(frames.run_envelopes(run))))
        super()._on_run(key, first, epoch, run)


def test_every_run_goes_through_the_hook_with_the_exact_bytes(pair: tuple[Node, Node]) -> None:
    # Replayed (the log's records) and live packed runs alike reach Subscriber._on_run, with
    # the publisher's envelope bytes unchanged: what the store keeps and a signature covers.
    a, b = pair
    stream = unique("hk")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(300))  # before the subscriber: replayed
        with _Recording(b, stream, start=Start.beginning()) as sub:
            got = drain(sub, 300)
            # live only once the publisher sends the stream to this connection (the replay
            # may finish before the subscription reaches it: then these would be replayed)
            wait_until(lambda: pub.stats().subscribers >= 1, timeout=10)
            pub.publish_many(range(300, 600))  # live, packed
            got += drain(sub, 300)
            assert [e.seq for e in got] == list(range(600))
            seqs = [s for first, _, _, envs in sub.runs for s in range(first, first + len(envs))]
            assert seqs == list(range(600))  # every delivered event, once, through the hook
            assert any(packed for _, _, packed, _ in sub.runs)
            assert {epoch for _, epoch, _, _ in sub.runs} == {pub.stats().epoch}
            log = [r.payload for r in pub._log.read(0, 600)]  # type: ignore[union-attr]
            assert [e for _, _, _, envs in sub.runs for e in envs] == log


def test_a_store_keeps_a_live_packed_stream_byte_for_byte(pair: tuple[Node, Node]) -> None:
    from patterns.pubsub.store import Store

    a, b = pair
    stream = unique("st").replace("-", "")
    store = Store(b, topics=(stream,))
    try:
        with Publisher(a, stream) as pub:
            wait_until(lambda: (pub.publish("probe"), store.holdings())[1], 10,
                       what="the store follows the stream")
            pub.publish_many(range(500))
            head = pub.head
            wait_until(lambda: any(h.head >= head for h in store.holdings()), 10,
                       what="the store caught up")
            assert sum(f.stats().packed_messages for f in store._followers) >= 1
            kept = [env for _, env in store.read(a.id, stream, 0, head)]
            log = [r.payload for r in pub._log.read(0, head)]  # type: ignore[union-attr]
            assert kept == log
    finally:
        store.close()


def test_batches_cut_inside_runs_hand_out_each_event_once_and_commit_per_stream(
        pair: tuple[Node, Node]) -> None:
    # The ready queue holds one item per run: a batch of 7 cuts a run of 100, recv() goes
    # on in the middle of it, and the positions committed are per stream, one past the last
    # event handed out and passed.
    a, b = pair
    base = unique("cut")
    with Publisher(a, base + ".x") as px, Publisher(a, base + ".y") as py:
        px.publish_many(range(100))
        py.publish_many(range(100))
        with Subscriber(b, base + ".", start=Start.beginning(), durable="cut",
                        auto_commit=False) as sub:
            got: dict[str, list[int]] = {base + ".x": [], base + ".y": []}
            deadline = time.monotonic() + 20
            while sum(map(len, got.values())) < 200 and time.monotonic() < deadline:
                batch = sub.recv_batch(timeout=0.2, max_events=7)
                assert len(batch) <= 7
                for ev in batch:
                    got[ev.stream].append(ev.seq or 0)
                ev = sub.recv(timeout=0.2)
                if ev is not None:
                    got[ev.stream].append(ev.seq or 0)
            assert got == {base + ".x": list(range(100)), base + ".y": list(range(100))}
            sub.commit()
            assert sorted(sub.positions().values()) == [100, 100]
