"""The p50 path of request/reply (branch rr2): less Python per round trip, same promises.

What each test guards:
- a served request's trace context is built only when something reads it, once per request
  (the same span id for every read inside one handler), and is then exactly the context the
  request's headers call for: nested requests and log records carry it (old code built it
  for every request before the handler ran);
- the deferred context is one object for every thread the handler starts with a copy of its
  context, built from the headers the request came with (not from later edits of them);
- with OpenTelemetry spans recording, the cheap entry point steps aside (the "serve" span is
  opened by ``consuming`` instead);
- the receivers' compact decoder (``frames.decode_compact``) accepts exactly the compact
  REQUESTs and REPLYs that ``decode`` accepts, and hands everything else (hostile or merely
  other commands) back to ``decode``, which names the fault;
- the lone reply written straight to the socket still counts its bytes, feeds the reply
  cache (a retry gets the cached reply, the handler runs once) and answers a split-form
  (1.0) caller in the split form.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

import msgpack
import pytest
import zmq

from mesh import tracing
from mesh.errors import ProtocolError
from mesh.node import Node
from patterns.reqrep import Client, Incoming, Service
from patterns.reqrep import frames as fr
from patterns.reqrep.service import routing_id
from tests.test_reqrep_real import responders
from tests.util import unique, wait_until


def test_handler_context_is_built_once_and_only_when_read(
        pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch) -> None:
    hub, srv = pair
    if tracing.otel_active():
        pytest.skip("a tracer provider is installed: the serve span path builds it eagerly")
    built: list[str] = []
    real = tracing.context_of_request

    def counting(request_id: str, headers: Any, service: str,
                 peer: str | None = None) -> tracing.TraceContext:
        built.append(request_id)
        return real(request_id, headers, service, peer)

    monkeypatch.setattr(tracing, "context_of_request", counting)
    quiet, looking, inner = unique("quiet"), unique("look"), unique("inner")
    seen: dict[str, Any] = {}
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    grab = Grab()
    grab.addFilter(tracing.TraceFilter())
    lg = logging.getLogger(unique("rr2.handler"))
    lg.addHandler(grab)
    lg.setLevel(logging.INFO)
    lg.propagate = False

    with Client(srv) as nested:
        def look(req: Incoming) -> object:
            first, second = tracing.current(), tracing.current()
            seen["first"], seen["second"], seen["id"] = first, second, req.id
            lg.info("inside")
            nested.request(inner, b"n", timeout=5)
            return b"ok"

        def inner_h(req: Incoming) -> object:
            seen["inner_headers"] = dict(req.headers)
            return b"in"

        with Service(srv, quiet, lambda r: r.payload, outcome_log=False), \
                Service(srv, looking, look, outcome_log=False), \
                Service(hub, inner, inner_h, outcome_log=False), Client(hub) as client:
            responders(hub, quiet, 1)
            responders(hub, looking, 1)
            wait_until(lambda: srv.who_offers("service", inner), 10, what="inner service")
            for i in range(20):
                assert client.request(quiet, b"q%d" % i, timeout=5) == b"q%d" % i
            # old code: one context built per request, read or not
            assert built == []
            assert client.request(looking, b"x", timeout=5) == b"ok"
    assert built == [seen["id"]]  # once, for the handler that read it (and its nested call)
    first, second = seen["first"], seen["second"]
    assert first is not None and first == second  # one span id for the whole handler
    assert first.trace_id == seen["id"].replace("-", "")  # no traceparent: the id names it
    assert first.causationid == seen["id"] and first.correlationid == seen["id"]
    assert first.stream == looking
    h = seen["inner_headers"]
    assert h["causationid"] == seen["id"] and h["correlationid"] == seen["id"]
    tp = tracing.parse_traceparent(h["traceparent"])
    assert tp is not None and tp[0] == first.trace_id and tp[1] == first.span_id
    (rec,) = records
    assert getattr(rec, "event_id", None) == seen["id"]
    assert getattr(rec, "trace_id", None) == first.trace_id
    assert tracing.current() is None  # nothing left behind on this thread


def test_enter_request_steps_aside_when_spans_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "otel_active", lambda: True)
    assert tracing.enter_request("r-1", {}, "svc") is None
    assert tracing.current() is None
    monkeypatch.setattr(tracing, "otel_active", lambda: False)
    tok = tracing.enter_request("r-2", {"correlationid": "c-2"}, "svc")
    assert tok is not None
    try:
        c = tracing.current()
        assert c is not None and c.correlationid == "c-2" and c.causationid == "r-2"
        assert tracing.current() is c
    finally:
        tracing.leave(tok)
    assert tracing.current() is None


def test_deferred_context_is_one_context_across_threads_and_header_edits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A handler that starts threads with a copy of its context, and edits its headers first:
    # every thread sees the one context, built from the headers the request came with.
    monkeypatch.setattr(tracing, "otel_active", lambda: False)
    headers = {"correlationid": "c-7",
               "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    tok = tracing.enter_request("r-7", headers, "svc")
    assert tok is not None
    try:
        headers["correlationid"] = "edited"
        del headers["traceparent"]
        ctxs = [contextvars.copy_context() for _ in range(8)]
        seen: list[tracing.TraceContext | None] = []
        start = threading.Barrier(8)

        def read(ctx: contextvars.Context) -> None:
            start.wait(5)
            seen.append(ctx.run(tracing.current))

        threads = [threading.Thread(target=read, args=(c,)) for c in ctxs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        mine = tracing.current()
    finally:
        tracing.leave(tok)
    assert len(seen) == 8 and all(c is mine for c in seen)  # one object: one span id
    assert mine is not None and mine.correlationid == "c-7"
    assert mine.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert mine.parent_span_id == "00f067aa0ba902b7"


_RID = "0190abcd-0000-7000-8000-000000000001"


def _compact(cmd: int, meta: Any, body: Any = b"b") -> bytes:
    return fr.SIGNATURE + bytes((cmd,)) + msgpack.packb([meta, body], use_bin_type=True)


def _with(meta: list[Any], i: int, v: Any) -> list[Any]:
    out = list(meta)
    out[i] = v
    return out


_REQ_META = [_RID, "svc", 5000, 0, 0, {"traceparent": "x"}, fr.REVISION]
_REP_META = [_RID, 0, 3, 0, "", "", fr.REVISION]
_GOOD = [
    fr.request_frames(fr.Request(_RID, "svc", 0, 0, fr.Format.BYTES, {}, b"x" * 100), 5000, 1)[0],
    fr.reply_frames(fr.Reply(_RID, fr.Status.ERROR, 0, fr.Format.BYTES, "E", "m"), 2)[0],
    _compact(1, _REQ_META[:6]),  # 1.1-1.2: no rev
    _compact(2, _REP_META),
]
_BAD = [
    b"", b"ZRR1", b"ZRR1\x01", b"XRR1\x01" + msgpack.packb([_REQ_META, b""]),
    b"ZRR1\x01\xc1",  # not msgpack
    _compact(1, _REQ_META, "str body"),  # BODY must be bin
    _compact(1, _with(_REQ_META, 0, "")),  # empty id
    _compact(1, _with(_REQ_META, 0, "x" * 65)),  # id too long
    _compact(1, _with(_REQ_META, 4, 7)),  # unknown format
    _compact(1, _with(_REQ_META, 2, True)),  # ttl not an int
    _compact(1, _with(_REQ_META, 3, -1)),  # negative attempt
    _compact(1, _with(_REQ_META, 5, {"k": 1})),  # header value not a string
    _compact(1, _with(_REQ_META, 5, {str(i): "v" for i in range(65)})),  # too many headers
    _compact(2, _with(_REP_META, 1, 9)),  # unknown status
    _compact(2, _with(_REP_META, 2, 2**40)),  # free out of range
    _compact(2, _with(_REP_META, 4, 1)),  # error type not a string
    _compact(1, _REQ_META[:3]),  # META too short
    fr.encode_ping(fr.Ping(1, _RID))[0],  # other commands: decode's business
    fr.encode_pong(fr.Pong(1, 2, _RID))[0],
    fr.batch_frame(fr.Command.REPLY, [_GOOD[1], _GOOD[3]]),
]


@pytest.mark.parametrize("frame", _GOOD, ids=[f"good{i}" for i in range(len(_GOOD))])
def test_decode_compact_accepts_what_decode_accepts(frame: bytes) -> None:
    got = fr.decode_compact(frame)
    assert got is not None
    assert got == fr.decode_rev([frame])


@pytest.mark.parametrize("frame", _BAD, ids=[f"bad{i}" for i in range(len(_BAD))])
def test_decode_compact_leaves_the_rest_to_decode(frame: bytes) -> None:
    assert fr.decode_compact(frame) is None
    try:
        m = fr.decode([frame])
    except Exception as exc:  # a typed error that names the fault, never another type
        assert isinstance(exc, ProtocolError), exc
    else:
        assert not isinstance(m, (fr.Request, fr.Reply))  # PING, PONG, BATCH


def test_lone_reply_counts_caches_and_answers_split_callers(
        pair: tuple[Node, Node], zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    hub, srv = pair
    name = unique("svc")
    runs: list[bytes] = []

    def handler(req: Incoming) -> object:
        runs.append(req.payload)
        return b"r:" + req.payload

    with Service(srv, name, handler, outcome_log=False) as svc:
        responders(hub, name, 1)
        ep = svc.endpoints[0]
        me = unique("caller").encode()
        dealer = zctx.socket(zmq.ROUTER)
        try:
            dealer.setsockopt(zmq.ROUTING_ID, me)
            dealer.setsockopt(zmq.ROUTER_MANDATORY, 1)
            dealer.connect(ep)
            _lone_replies(svc, dealer, routing_id(srv.id, name), me, name, runs)
        finally:
            dealer.close(0)


def _lone_replies(svc: Service, dealer: zmq.Socket[bytes], rid: bytes, me: bytes, name: str,
                  runs: list[bytes]) -> None:
    def call(frames: list[bytes]) -> list[bytes]:
        wait_until(lambda: _try_send(dealer, rid, frames), 5, what="routable")
        assert dealer.poll(5000), "no reply"
        got = dealer.recv_multipart()
        assert got[0] == rid
        return got[1:]

    before = svc.stats()
    req = fr.Request(_RID, name, 0, 0, fr.Format.BYTES, {}, b"one")
    first = call(fr.request_frames(req, 5000, 0))
    assert len(first) == 1 and fr.decode(first).body == b"r:one"  # type: ignore[union-attr]
    after = svc.stats()
    # what went out to this caller: its routing id and the one compact frame
    assert after.bytes_out - before.bytes_out == len(me) + len(first[0])
    assert after.replied - before.replied == 1
    again = call(fr.request_frames(req, 5000, 1))  # a retry: the cached reply, not a run
    assert again == first and runs == [b"one"]
    assert svc.stats().cache_hits == 1
    # a 1.0 caller (split form): the lone reply goes out in the split form
    split = fr.to_split(fr.request_frames(
        fr.Request("0190abcd-0000-7000-8000-000000000002", name, 0, 0, fr.Format.BYTES, {},
                   b"two"), 5000, 0))
    got = call(split)
    assert len(got) == 3 and got[0] == fr.SIGNATURE + b"\x02" and got[2] == b"r:two"
    assert runs == [b"one", b"two"]


def _try_send(sock: zmq.Socket[bytes], rid: bytes, frames: list[bytes]) -> bool:
    try:
        sock.send_multipart([rid, *frames])
        return True
    except zmq.ZMQError:
        return False
