"""Pure logic of request/reply: frames, backoff, reply cache, balancer, call state machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, ProtocolError
from patterns.reqrep import frames as fr
from patterns.reqrep.balancer import Balancer
from patterns.reqrep.cache import Lookup, ReplyCache
from patterns.reqrep.call import Call, CallConfig, Ping, Send
from patterns.reqrep.errors import (
    NoResponders,
    OutcomeUnknown,
    RemoteError,
    RequestTimeout,
    ServiceBusy,
)
from patterns.reqrep.retry import Backoff, Deadline


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_frames_round_trip() -> None:
    req = fr.Request("id1", "svc", 1500, 2, fr.Format.MSGPACK, {"traceparent": "00-a"}, b"\x01")
    assert len(fr.encode_request(req)) == 1  # compact form: one frame
    assert fr.decode(fr.encode_request(req)) == req
    rep = fr.Reply("id1", fr.Status.ERROR, 3, fr.Format.BYTES, "KeyError", "k", b"")
    assert fr.decode(fr.encode_reply(rep)) == rep
    assert fr.decode(fr.encode_ping(fr.Ping(7, "id1"))) == fr.Ping(7, "id1")
    pong = fr.Pong(7, -2, "id1", fr.TaskState.DONE)
    assert fr.decode(fr.encode_pong(pong)) == pong


def test_large_bodies_use_the_split_form_and_both_forms_decode() -> None:
    big = b"b" * (fr.COMPACT_MAX + 1)
    req = fr.Request("id1", "svc", 1500, 0, fr.Format.BYTES, {}, big)
    frames = fr.encode_request(req)
    assert len(frames) == 3 and frames[2] is big  # the body is its own (uncopied) frame
    assert fr.decode(frames) == req
    rep = fr.Reply("id1", fr.Status.OK, 1, fr.Format.BYTES, body=big)
    assert len(fr.encode_reply(rep)) == 3 and fr.decode(fr.encode_reply(rep)) == rep
    # a small message in the split form (what a sender may always use) decodes the same
    small = fr.Request("id2", "svc", 10, 1, fr.Format.BYTES, {"a": "b"}, b"x")
    split = [fr.SIGNATURE + b"\x01", fr._packb(["id2", "svc", 10, 1, 0, {"a": "b"}]), b"x"]
    assert fr.decode(split) == small == fr.decode(fr.encode_request(small))
    assert fr.decode([fr.SIGNATURE + b"\x03", fr._packb([7, "id1"])]) == fr.Ping(7, "id1")


@given(st.lists(st.binary(max_size=64), max_size=5))
def test_decode_garbage_raises_only_protocol_error(frames: list[bytes]) -> None:
    try:
        fr.decode(frames)
    except ProtocolError:
        pass


@given(st.binary(max_size=64), st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04"]))
def test_decode_garbage_meta_raises_only_protocol_error(meta: bytes, cmd: bytes) -> None:
    for frames in ([fr.SIGNATURE + cmd, meta], [fr.SIGNATURE + cmd, meta, b""],
                   [fr.SIGNATURE + cmd + meta]):
        try:
            fr.decode(frames)
        except ProtocolError:
            pass


def test_decode_rejects_bad_fields() -> None:
    head = fr.SIGNATURE + b"\x01"
    meta = fr._packb(["i", "s", 1, 0, 0, {}])
    assert fr.decode([head, meta, b""]).id == "i"  # the baseline the variants break
    bad_metas = (["", "s", 1, 0, 0, {}], ["i", "s", 1, 0, 9, {}], ["i", "s", 1, 0, True, {}],
                 ["i", "s", 1, 0, 0, {"k": 1}])
    bads: list[list[bytes]] = [
        [b"ZRR2\x01", meta, b""], [b"ZRR1\x07", meta, b""], [head, meta],
        [head + b"x", meta, b""],  # a split HEAD longer than 5 bytes
        [head], [b"ZRR1"],  # compact with nothing after HEAD / no command byte
        [head + fr._packb([["i", "s", 1, 0, 0, {}]])],  # compact without BODY
        [head + fr._packb([["i", "s", 1, 0, 0, {}], "not bin"])],  # BODY not bin
    ]
    for m in bad_metas:
        bads.append([head, fr._packb(m), b""])
        bads.append([head + fr._packb([m, b""])])
    for bad in bads:
        with pytest.raises(ProtocolError):
            fr.decode(bad)


def test_backoff_full_jitter_bounds() -> None:
    b = Backoff(base=0.01, cap=0.2)
    assert [b.ceiling(i) for i in range(6)] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.2]
    assert b.delay(3, lambda: 0.0) == 0.0 and b.delay(3, lambda: 0.999) < 0.08
    with pytest.raises(ConfigError):
        Backoff(base=0.5, cap=0.1)


def test_deadline_math() -> None:
    c = Clock()
    d = Deadline(1.5, c)
    c.t += 1.0
    assert d.remaining() == pytest.approx(0.5) and d.cap(2.0) == pytest.approx(0.5)
    assert d.ttl_ms() == 500 and not d.expired()
    c.t += 1.0
    assert d.expired() and d.remaining() == 0 and d.ttl_ms() == 0
    with pytest.raises(ConfigError):
        Deadline(0, c)


def test_cache_runs_once_attaches_and_replays_then_expires() -> None:
    c = Clock()
    cache: ReplyCache[str, str] = ReplyCache(10.0, 2, c)
    assert cache.begin("r1", "a") == (Lookup.NEW, None)
    assert cache.begin("r1", "b") == (Lookup.ATTACHED, None)
    assert cache.state("r1") is Lookup.ATTACHED
    assert cache.finish("r1", "reply") == ["a", "b"]
    assert cache.begin("r1", "a") == (Lookup.CACHED, "reply")
    assert cache.state("r1") is Lookup.CACHED
    c.t += 10.0
    assert cache.state("r1") is None
    assert cache.begin("r1", "a") == (Lookup.NEW, None)
    for rid in ("x", "y", "z"):
        cache.begin(rid, "a")
        cache.finish(rid, rid)
    assert len(cache) == 2 and cache.begin("x", "a")[0] is Lookup.NEW  # size bound


def test_balancer_prefers_free_capacity_and_skips_silent() -> None:
    c = Clock()
    b = Balancer(c, silent_s=5.0, rand=lambda: 0.0)
    b.add("a")
    b.add("b")
    b.heard("a", free=1)
    b.heard("b", free=4)
    assert b.choose() == "b"
    for _ in range(3):
        b.started("b")
    assert b.choose() in ("a", "b")  # equal scores now
    b.started("b")
    assert b.choose() == "a"
    b.mark_silent("a")
    assert b.choose() == "b"
    assert b.choose(exclude={"b"}) == "b"  # only excluded ones left: retrying beats failing
    c.t += 5.1
    assert not b.is_silent("a")
    b.mark_silent("a")
    b.add("a")  # re-announced (restart): usable at once
    assert not b.is_silent("a")
    b.remove("a")
    b.remove("b")
    assert b.choose() is None


CFG = CallConfig(heartbeat_s=0.1, liveness=3, backoff=Backoff(0.01, 0.1), poll_s=0.05)


def ok(rid: str, free: int = 1) -> fr.Reply:
    return fr.Reply(rid, fr.Status.OK, free, fr.Format.BYTES, body=b"r")


def test_silence_is_not_death_the_call_stays_and_keeps_asking() -> None:
    c = Clock()
    b = Balancer(c, rand=lambda: 0.0)
    b.add("a")
    b.add("b")
    call = Call("r", "s", 5.0, c.t, CFG)
    first = call.step(c.t, b)
    assert len(first) == 1 and isinstance(first[0], Send)
    r1 = first[0].responder
    for _ in range(30):  # 3 s of silence (a GIL-holding handler, SIGSTOP, a partition)
        c.t += 0.1
        assert call.step(c.t, b) == [Ping(r1)]
    assert call.responder == r1 and call.failovers == 0 and call.attempts == 1
    assert b.is_silent(r1)  # new calls avoid it ...
    assert b.choose() != r1
    call.on_reply(r1, ok("r"), c.t, b)  # ... but its reply is still the one we wait for
    assert call.done and call.error is None and not b.is_silent(r1)


def test_a_dead_holder_is_outcome_unknown_never_a_second_responder() -> None:
    c = Clock()
    b = Balancer(c, rand=lambda: 0.0)
    b.add("a")
    b.add("b")
    call = Call("r", "s", 5.0, c.t, CFG)
    r1 = call.step(c.t, b)[0].responder
    b.remove(r1)  # presence LEFT before it said RUNNING: it may have run it all the same
    assert call.step(c.t, b) == [] and isinstance(call.error, OutcomeUnknown)
    assert "was sent to" in str(call.error) and call.failovers == 0
    call = Call("q", "s", 5.0, c.t, CFG)
    r2 = call.step(c.t, b)[0].responder
    c.t += 0.1
    assert call.step(c.t, b) == [Ping(r2)]
    assert call.on_pong(r2, fr.Pong(1, 0, "q", fr.TaskState.RUNNING), c.t, b) is None
    call.on_lost(r2, c.t, b)  # its PING was unroutable: the process is gone, mid-handler
    assert call.done and isinstance(call.error, OutcomeUnknown)
    assert call.error.responder == r2 and "was running on" in str(call.error)


def test_a_refusal_or_a_failed_send_still_moves_the_request() -> None:
    c = Clock()
    b = Balancer(c, rand=lambda: 0.0)
    b.add("a")
    b.add("b")
    call = Call("r", "s", 5.0, c.t, CFG)
    r1 = call.step(c.t, b)[0].responder
    call.on_reply(r1, fr.Reply("r", fr.Status.UNKNOWN_SERVICE, 0, fr.Format.BYTES), c.t, b)
    actions = call.step(c.t, b)
    assert isinstance(actions[0], Send) and actions[0].responder != r1
    r2 = actions[0].responder
    call.on_send_failed(r2, c.t, b)  # never left this process: choose again after a backoff
    assert call.responder is None and not call.done


def test_retry_on_death_fails_over_a_running_request() -> None:
    c = Clock()
    b = Balancer(c, rand=lambda: 0.0)
    b.add("a")
    b.add("b")
    cfg = CallConfig(heartbeat_s=0.1, liveness=3, backoff=Backoff(0.01, 0.1), poll_s=0.05,
                     retry_on_death=True)
    call = Call("r", "s", 5.0, c.t, cfg)
    r1 = call.step(c.t, b)[0].responder
    call.on_pong(r1, fr.Pong(1, 0, "r", fr.TaskState.RUNNING), c.t, b)
    b.remove(r1)
    actions = call.step(c.t, b)
    assert isinstance(actions[0], Send) and actions[0].responder != r1 and not call.done


def test_call_resends_on_done_pong_and_waits_on_running() -> None:
    c = Clock()
    b = Balancer(c)
    b.add("a")
    call = Call("r", "s", 2.0, c.t, CFG)
    call.step(c.t, b)
    running = fr.Pong(1, 0, "r", fr.TaskState.RUNNING)
    for _ in range(10):  # a slow handler that answers pings is never abandoned
        c.t += 0.1
        assert call.step(c.t, b) == [Ping("a")]
        assert call.on_pong("a", running, c.t, b) is None
    assert call.responder == "a"
    assert call.on_pong("a", fr.Pong(2, 1, "r", fr.TaskState.DONE), c.t, b) == Send("a", 1)


def test_call_no_responders_at_the_deadline() -> None:
    c = Clock()
    b = Balancer(c)
    call = Call("r", "svc", 0.5, c.t, CFG)
    while True:
        call.step(c.t, b)
        if call.done:
            break
        assert call.wake_at() <= 100.5
        c.t = call.wake_at()
    assert isinstance(call.error, NoResponders) and c.t == 100.5


def test_call_timeout_busy_and_remote_error() -> None:
    c = Clock()
    b = Balancer(c, rand=lambda: 0.0)
    b.add("a")
    call = Call("r", "svc", 0.5, c.t, CFG)
    call.step(c.t, b)
    c.t += 0.5
    call.step(c.t, b)
    assert isinstance(call.error, RequestTimeout) and isinstance(call.error, TimeoutError)
    busy = Call("q", "svc", 0.5, c.t, CFG)
    busy.step(c.t, b)
    busy.on_reply("a", fr.Reply("q", fr.Status.BUSY, 0, fr.Format.BYTES), c.t, b)
    c.t += 0.5
    busy.step(c.t, b)
    assert isinstance(busy.error, ServiceBusy)
    err = Call("e", "svc", 1.0, c.t, CFG)
    err.step(c.t, b)
    err.on_reply("a", fr.Reply("e", fr.Status.ERROR, 0, fr.Format.BYTES, "KeyError", "x"), c.t, b)
    assert isinstance(err.error, RemoteError) and err.error.type == "KeyError"


def test_exports() -> None:
    import patterns.reqrep as rr

    assert rr.__all__ == sorted(rr.__all__)
    assert all(hasattr(rr, name) for name in rr.__all__)
