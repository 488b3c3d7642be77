"""Pure pub/sub logic: frame codecs, the gap tracker, the dedup window (no I/O)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ConfigError, EventTooLarge, ProtocolError, UnsupportedVersion
from patterns.pubsub import frames
from patterns.pubsub.dedup import Dedup
from patterns.pubsub.gaps import Step, StreamTracker

PUB = bytes(range(16))


# --- frames ----------------------------------------------------------------------------------


def test_data_frames_roundtrip() -> None:
    msg = frames.encode_data(b"a.b", PUB, 7, 41, [b"x", b"yy"], durable=True)
    stream, head, envs = frames.decode_message(msg, max_event_size=10)
    assert stream == "a.b" and envs == [b"x", b"yy"]
    assert head == frames.Header(frames.KIND_DATA, True, PUB.hex(), 7, 41, 2)


def test_heartbeat_roundtrip() -> None:
    msg = frames.encode_heartbeat(b"s", PUB, 0, 99, durable=False)
    stream, head, envs = frames.decode_message(msg, max_event_size=10)
    assert (stream, head.kind, head.seq, head.durable, envs) == (
        "s", frames.KIND_HEARTBEAT, 99, False, [])


@pytest.mark.parametrize("msg", [
    [b"only-topic"],
    [b"", frames.encode_heartbeat(b"s", PUB, 0, 1, True)[1]],
    [b"s", b"\x01short"],
    [b"\xff\xfe", frames.encode_heartbeat(b"s", PUB, 0, 1, True)[1]],
    [b"s", frames.HEADER.pack(1, 9, 0, PUB, 0, 0, 0)],  # unknown kind
    [b"s", frames.HEADER.pack(1, 1, 0, PUB, 0, 0, 3), b"a"],  # count mismatch
    [b"s", frames.HEADER.pack(1, 1, 0, PUB, 0, 0, 0)],  # empty data
    [b"s", frames.HEADER.pack(1, 2, 0, PUB, 0, 0, 0), b"x"],  # heartbeat with body
    [b"s", frames.HEADER.pack(1, 2, 0x80, PUB, 0, 0, 0)],  # unknown flag
])
def test_malformed_data_raises_protocol_error(msg: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        frames.decode_message(msg, max_event_size=10)


def test_wrong_version_and_oversize_are_typed() -> None:
    bad = frames.HEADER.pack(2, 1, 0, PUB, 0, 0, 1)
    with pytest.raises(UnsupportedVersion):
        frames.decode_message([b"s", bad, b"x"], max_event_size=10)
    with pytest.raises(UnsupportedVersion):
        frames.decode_message([b"s", b"\x07garbage"], max_event_size=10)
    with pytest.raises(EventTooLarge):
        frames.decode_message(frames.encode_data(b"s", PUB, 0, 0, [b"x" * 11], True),
                              max_event_size=10)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=5))
def test_decode_message_never_raises_untyped(msg: list[bytes]) -> None:
    try:
        frames.decode_message(msg, max_event_size=50)
    except (ProtocolError, UnsupportedVersion, EventTooLarge):
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.binary(), st.dictionaries(
    st.sampled_from(["v", "sid", "req", "stream", "from", "from_time", "to", "max",
                     "max_bytes", "first", "events", "head", "oldest", "gone", "error",
                     "name", "pos"]),
    st.one_of(st.none(), st.integers(-5, 2**65), st.text(max_size=5), st.booleans(),
              st.lists(st.binary(max_size=5), max_size=3)))))
def test_control_decoders_never_raise_untyped(body: object) -> None:
    for dec in (frames.decode_replay_request, frames.decode_ack,
                lambda b: frames.decode_replay_data(b, max_event_size=4)):
        try:
            dec(body)
        except (ProtocolError, UnsupportedVersion, EventTooLarge):
            pass


def test_control_bodies_roundtrip() -> None:
    rq = frames.ReplayRequest("sid", 3, "s", 10, None, 20, 500, 1 << 20)
    assert frames.decode_replay_request(rq.to_body()) == rq
    rd = frames.ReplayData("sid", 3, "s", 10, [b"a"], 11, 0, False, None)
    assert frames.decode_replay_data(rd.to_body(), max_event_size=5) == rd
    ack = frames.Ack("agg", "s", 42)
    assert frames.decode_ack(ack.to_body()) == ack
    with pytest.raises(UnsupportedVersion):
        frames.decode_ack({**ack.to_body(), "v": 2})
    with pytest.raises(ProtocolError):
        frames.decode_replay_request({**rq.to_body(), "from": None})


def test_node_id_bytes() -> None:
    assert frames.node_id_bytes(PUB.hex()) == PUB
    for bad in ("zz" * 16, "ab"):
        with pytest.raises(ProtocolError):
            frames.node_id_bytes(bad)


# --- tracker ---------------------------------------------------------------------------------


def flat(step: Step) -> list[int]:
    out: list[int] = []
    for first, payloads in step.deliver:
        out.extend(range(first, first + len(payloads)))
        assert payloads == [str(s).encode() for s in range(first, first + len(payloads))]
    return out


def p(a: int, b: int) -> list[bytes]:
    return [str(s).encode() for s in range(a, b)]


def test_in_order_is_one_run_and_duplicates_drop() -> None:
    t = StreamTracker(0)
    assert flat(t.on_live(0, p(0, 3), 0.0)) == [0, 1, 2]
    assert flat(t.on_live(1, p(1, 5), 0.0)) == [3, 4]
    assert flat(t.on_live(0, p(0, 2), 0.0)) == []
    assert t.stats.duplicates == 4 and t.expected == 5


def test_gap_asks_replay_buffers_live_and_fills_in_order() -> None:
    t = StreamTracker(0)
    t.on_live(0, p(0, 2), 0.0)
    step = t.on_live(5, p(5, 7), 0.0)
    assert step.deliver == [] and step.ask is not None
    assert (step.ask.start, step.ask.end) == (2, 7)
    assert t.on_live(7, p(7, 8), 0.0).ask is None  # one request at a time
    step = t.on_replay(step.ask.req, 2, p(2, 6), 8, 0, False, 0.0)
    assert flat(step) == [2, 3, 4, 5, 6, 7] and step.ask is None and t.buffered == 0


def test_replay_in_chunks_asks_for_next() -> None:
    t = StreamTracker(0)
    ask = t.start(0.0).ask
    assert ask is not None and ask.start == 0
    step = t.on_replay(ask.req, 0, p(0, 100), 250, 0, False, 0.0)
    assert flat(step) == list(range(100)) and step.ask is not None and step.ask.start == 100
    step2 = t.on_replay(step.ask.req, 100, p(100, 250), 250, 0, False, 0.0)
    assert flat(step2) == list(range(100, 250)) and step2.ask is None


def test_stale_reply_is_ignored() -> None:
    t = StreamTracker(0)
    ask = t.start(0.0).ask
    assert ask is not None
    assert t.on_replay(ask.req + 7, 0, p(0, 3), 3, 0, False, 0.0).deliver == []
    assert t.stats.stale_replies == 1


def test_heartbeat_detects_lost_tail() -> None:
    t = StreamTracker(0)
    t.on_live(0, p(0, 3), 0.0)
    step = t.on_heartbeat(6, 0.0)
    assert step.ask is not None and (step.ask.start, step.ask.end) == (3, 6)
    assert t.on_heartbeat(3, 0.0).ask is None


def test_new_only_starts_at_heartbeat_head_or_first_live() -> None:
    t = StreamTracker(None)
    assert t.on_heartbeat(40, 0.0).ask is None and t.expected == 40
    t2 = StreamTracker(None)
    assert flat(t2.on_live(9, p(9, 11), 0.0)) == [9, 10]


def test_time_start_holds_live_until_resolved() -> None:
    t = StreamTracker(None, from_time=123)
    ask = t.start(0.0).ask
    assert ask is not None and ask.from_time == 123 and ask.start is None
    assert t.on_live(50, p(50, 52), 0.0).deliver == []
    step = t.on_replay(ask.req, 40, p(40, 50), 50, 0, False, 0.0)
    assert flat(step) == list(range(40, 52))


def test_retention_gone_skips_with_counter() -> None:
    t = StreamTracker(0)
    ask = t.start(0.0).ask
    assert ask is not None
    step = t.on_replay(ask.req, 30, p(30, 35), 35, 30, True, 0.0)
    assert step.skipped == (0, 30) and flat(step) == list(range(30, 35))
    assert t.stats.skipped == 30


def test_best_effort_skips_gaps() -> None:
    t = StreamTracker(0, replayable=False)
    t.on_live(0, p(0, 2), 0.0)
    step = t.on_live(5, p(5, 6), 0.0)
    assert flat(step) == [5] and step.skipped == (2, 5) and step.ask is None
    assert t.on_heartbeat(9, 0.0).skipped == (6, 9)


def test_buffer_is_bounded_and_replay_refills() -> None:
    t = StreamTracker(0, max_buffer=3)
    step = t.on_live(1, p(1, 10), 0.0)
    assert t.buffered == 3 and t.stats.buffer_dropped == 6 and step.ask is not None
    step = t.on_replay(step.ask.req, 0, p(0, 5), 10, 0, False, 0.0)
    assert flat(step) == [0, 1, 2, 3, 4] and step.ask is not None and step.ask.start == 5
    assert flat(t.on_replay(step.ask.req, 5, p(5, 10), 10, 0, False, 0.0)) == list(range(5, 10))


def test_unanswered_request_is_retried() -> None:
    t = StreamTracker(0, retry_s=1.0)
    ask = t.start(0.0).ask
    assert ask is not None
    assert t.on_tick(0.5).ask is None
    again = t.on_tick(1.5).ask
    assert again is not None and again.req != ask.req and again.start == 0
    assert t.stats.replay_retries == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 300), st.integers(1, 50))
def test_random_loss_dup_reorder_delivers_exactly_once_in_order(seed: int, n: int,
                                                               buf: int) -> None:
    rng = random.Random(seed)
    t = StreamTracker(0, max_buffer=buf)
    got: list[int] = []
    pending: list[tuple[int, int]] = []  # outstanding asks (req, start)
    now = 0.0

    def run(step: Step) -> None:
        got.extend(flat(step))
        if step.ask is not None:
            assert step.ask.start is not None
            pending.append((step.ask.req, step.ask.start))

    seq = 0
    while seq < n:
        k = rng.randint(1, 5)
        k = min(k, n - seq)
        if rng.random() < 0.7:
            run(t.on_live(seq, p(seq, seq + k), now))
        if rng.random() < 0.1 and seq > 0:  # a duplicate of something older
            a = rng.randrange(0, seq)
            run(t.on_live(a, p(a, min(seq, a + 3)), now))
        seq += k
        if pending and rng.random() < 0.3:
            req, start = pending.pop(0)
            m = rng.randint(1, 20)
            run(t.on_replay(req, start, p(start, min(seq, start + m)), seq, 0, False, now))
        if rng.random() < 0.1:
            run(t.on_heartbeat(seq, now))
    for _ in range(10 * n + 10):
        if t.expected == n:
            break
        now += 10.0
        if pending:
            req, start = pending.pop(0)
            run(t.on_replay(req, start, p(start, min(n, start + 7)), n, 0, False, now))
        else:
            run(t.on_heartbeat(n, now))
            run(t.on_tick(now))
    assert got == list(range(n))
    assert t.buffered == 0


# --- dedup -----------------------------------------------------------------------------------


def test_dedup_window() -> None:
    d = Dedup(window=2)
    assert d.first_time("a") and d.first_time("b") and not d.first_time("a")
    assert d.first_time("c")  # evicts "a"
    assert d.first_time("a") and d.duplicates == 1 and len(d) == 2
    with pytest.raises(ConfigError):
        Dedup(window=0)


def test_replay_request_max_and_max_bytes_are_optional() -> None:
    # Before 1.3 a request without them was a ProtocolError: dropped unanswered, retried
    # every retry_s forever. Absent or nil now means the publisher's caps.
    body = {"v": 1, "sid": "s", "req": 1, "stream": "t", "from": 0}
    rq = frames.decode_replay_request(body)
    assert (rq.max_records, rq.max_bytes) == (frames.REPLAY_MAX_RECORDS, frames.REPLAY_MAX_BYTES)
    rq = frames.decode_replay_request({**body, "max": None, "max_bytes": 7})
    assert (rq.max_records, rq.max_bytes) == (frames.REPLAY_MAX_RECORDS, 7)
    with pytest.raises(ProtocolError):
        frames.decode_replay_request({**body, "max": 0})


def test_malformed_replay_request_is_answerable_when_routable() -> None:
    bad = {"v": 1, "sid": "s", "req": 9, "stream": "t", "from": 0, "max": -1}
    with pytest.raises(ProtocolError):
        frames.decode_replay_request(bad)
    assert frames.replay_reply_target(bad) == ("s", 9, "t")
    for unroutable in (None, 7, {"v": 2, "sid": "s", "req": 9, "stream": "t"},
                       {"v": 1, "sid": "s", "stream": "t"}, {"v": 1, "sid": 3, "req": 1,
                                                              "stream": "t"}):
        assert frames.replay_reply_target(unroutable) is None


def test_trim_chunk_stops_at_the_subscribers_limits() -> None:
    from patterns.pubsub.frames import trim_chunk

    ev = [b"a" * 10, b"b" * 10, b"c" * 50, b"d" * 10]
    # over max_event first: skipped alone, first moves past it
    chunk = [b"x" * 50, b"y"]
    assert trim_chunk(chunk, 7, 1 << 20, 20, None) == (8, (7, 8, "oversize")) and chunk == []
    # over max_event later: the chunk stops before it
    chunk = list(ev)
    assert trim_chunk(chunk, 0, 1 << 20, 20, None) == (0, None) and chunk == ev[:2]
    # over max_bytes: stops once passed, keeps at least one event
    chunk = list(ev)
    assert trim_chunk(chunk, 0, 15, None, None) == (0, None) and chunk == ev[:1]
    chunk = [b"z" * 100]
    assert trim_chunk(chunk, 3, 15, None, (1, 3, "damaged")) == (3, (1, 3, "damaged"))
    assert chunk == [b"z" * 100]
