"""Trace context: ``traceparent``, correlation and causation ids that follow the work.

When a handler consumes an event (or serves a request), that event becomes the *current*
context of the handler (a :mod:`contextvars` variable, so it follows threads' own stacks and
asyncio tasks). Events the handler publishes and requests it makes then default to:

* ``traceparent``: W3C ``00-<trace id>-<span id>-<flags>`` with the consumed event's trace id
  and a new span id (the handler's span). An event without a ``traceparent`` starts a trace
  whose id is its own id (a UUIDv7 is 32 hex digits), so every descendant of one root event
  shares one trace id without any coordination.
* ``correlationid``: the consumed event's ``correlationid``, or its ``id`` when it has none
  (the first event of a conversation names the conversation).
* ``causationid``: the consumed event's ``id``.

Explicit arguments always win over these defaults. Outside a handler nothing is filled in.

OpenTelemetry: when ``opentelemetry-api`` is importable (the ``otel`` extra) and a tracer
provider is installed (an SDK), :func:`consuming` and :func:`span` open real spans (publish,
consume, request, serve) as children of the traceparent; otherwise they cost one
``contextvars`` set/reset and one :func:`otel_active` check (the API alone hands out no-op
spans, which cost 10-12 µs each on the request/reply path and record nothing).

Logging: :class:`TraceFilter` adds ``trace_id``, ``correlation_id``, ``event_id`` (and
``stream``/``peer`` when known) to every record logged inside a handler; :func:`log_extra` and
:class:`EventLogAdapter` do the same for an explicit event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, NamedTuple

__all__ = [
    "EventLogAdapter",
    "TraceContext",
    "TraceFilter",
    "child_fields",
    "consuming",
    "context_from",
    "context_of_request",
    "current",
    "enter_request",
    "leave",
    "log_extra",
    "new_span_id",
    "otel_active",
    "parse_traceparent",
    "request_headers",
    "span",
    "use",
    "use_event",
]

try:  # optional: real spans when the OpenTelemetry API is installed
    from opentelemetry import trace as _otel_trace  # type: ignore[import-not-found,unused-ignore]
    from opentelemetry.trace import (  # type: ignore[import-not-found,unused-ignore]
        NonRecordingSpan as _NonRecordingSpan,
    )
    from opentelemetry.trace import SpanContext as _SpanContext  # type: ignore[import-not-found,unused-ignore]
    from opentelemetry.trace import TraceFlags as _TraceFlags  # type: ignore[import-not-found,unused-ignore]

    OTEL = True
except ImportError:  # pragma: no cover - depends on the environment
    OTEL = False

_NO_SLOT = object()


def otel_active() -> bool:
    """True when spans would record: the OpenTelemetry API is importable and a real tracer
    provider (an SDK's, or any but the API's proxy/no-op ones) is installed.

    Checked per call (a provider may be installed after import) at about 0.1 µs: the API's
    global slot is read directly, because ``get_tracer_provider()`` consults the environment
    on every call while none is set; the public call is the fallback.
    """
    if not OTEL:
        return False
    p = getattr(_otel_trace, "_TRACER_PROVIDER", _NO_SLOT)
    if p is _NO_SLOT:
        p = _otel_trace.get_tracer_provider()
    return p is not None and not isinstance(
        p, (_otel_trace.ProxyTracerProvider, _otel_trace.NoOpTracerProvider))


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
# Span ids need to be unique, not secret: a seeded PRNG costs a fifth of os.urandom().
_rand = random.Random(os.urandom(16))


def new_span_id() -> str:
    """A random 16-hex-digit W3C span id (never all zeros)."""
    return f"{_rand.getrandbits(64) or 1:016x}"


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace id, parent span id, flags)`` from a W3C ``traceparent``, or None if invalid.

    Invalid values are ignored rather than raised: a foreign producer's bad header must not
    fail the consumer (the W3C spec says to start a new trace then).
    """
    if not value or len(value) < 55:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        m = _TRACEPARENT.fullmatch(value.lower())
        if m is None:
            return None
    ver, tid, sid, flags, rest = m.groups()
    if ver == "ff" or tid == "0" * 32 or sid == "0" * 16 or (ver == "00" and rest):
        return None
    return tid, sid, flags


class TraceContext(NamedTuple):
    """The current handler's trace context.

    Attributes:
        trace_id: 32 hex digits shared by the whole trace.
        span_id: this handler's span (16 hex digits); the parent of what it publishes.
        parent_span_id: the span of the event being handled (None for a new trace).
        flags: W3C trace flags (``"01"`` sampled).
        correlationid: the conversation id to put on outgoing events and requests.
        causationid: the id of the event being handled.
        event_id: same as ``causationid`` (kept for logging).
        stream: the stream (or queue / service) of the consumed message, if known.
        peer: the node the message came from, if known.
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    flags: str = "01"
    correlationid: str | None = None
    causationid: str | None = None
    event_id: str | None = None
    stream: str | None = None
    peer: str | None = None

    @property
    def traceparent(self) -> str:
        """The W3C header for children of this handler."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


class _Deferred:
    """A served request's context, built the first time something reads it (see
    :func:`enter_request`): most handlers never do, and building it (a trace id from the
    request id, a random span id, a 9-field tuple) was about 2 µs per request. The two
    headers it needs are read when it is made (a handler that edits ``req.headers`` does not
    change its own context), and it is built once under a lock (a thread the handler starts
    with a copy of its context sees the same span id)."""

    __slots__ = ("_ctx", "correlationid", "peer", "request_id", "service", "traceparent")

    def __init__(self, request_id: str, headers: Mapping[str, str], service: str,
                 peer: str | None) -> None:
        self.request_id = request_id
        self.traceparent = headers.get("traceparent") if headers else None
        self.correlationid = headers.get("correlationid") if headers else None
        self.service = service
        self.peer = peer
        self._ctx: TraceContext | None = None

    def resolve(self) -> TraceContext:
        c = self._ctx
        if c is None:
            with _resolve_lock:
                c = self._ctx
                if c is None:
                    h = {}
                    if self.traceparent is not None:
                        h["traceparent"] = self.traceparent
                    if self.correlationid is not None:
                        h["correlationid"] = self.correlationid
                    c = self._ctx = context_of_request(self.request_id, h, self.service,
                                                       self.peer)
        return c


_resolve_lock = threading.Lock()  # taken only on a deferred context's first read


_current: ContextVar[TraceContext | _Deferred | None] = ContextVar("zeromesh_trace",
                                                                   default=None)


def _get() -> TraceContext | None:
    c = _current.get()
    if c is None or type(c) is TraceContext:
        return c
    return c.resolve()  # type: ignore[union-attr]


_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO32 = "0" * 32


def _trace_id_for(event_id: str | None) -> str:
    if event_id:
        h = event_id.replace("-", "")
        if len(h) == 32:
            if _HEX32.fullmatch(h) is None:  # ids are lowercase UUIDs: lower() only if not
                h = h.lower()
                if _HEX32.fullmatch(h) is None:
                    h = _ZERO32
            if h != _ZERO32:
                return h
    return f"{_rand.getrandbits(128) or 1:032x}"


def context_from(*, event_id: str | None = None, traceparent: str | None = None,
                 correlationid: str | None = None, stream: str | None = None,
                 peer: str | None = None) -> TraceContext:
    """The context of a handler consuming a message with these fields."""
    parsed = parse_traceparent(traceparent)
    if parsed is not None:
        tid, parent, flags = parsed
    else:
        tid, parent, flags = _trace_id_for(event_id), None, "01"
    return TraceContext(tid, new_span_id(), parent, flags,
                        correlationid or event_id, event_id, event_id, stream, peer)


def _of_event(event: Any, peer: str | None) -> TraceContext:
    return context_from(event_id=getattr(event, "id", None),
                        traceparent=getattr(event, "traceparent", None),
                        correlationid=getattr(event, "correlationid", None),
                        stream=getattr(event, "stream", None) or None, peer=peer)


def current() -> TraceContext | None:
    """The context of the handler running in this thread / task, or None."""
    return _get()


def use(ctx: TraceContext | None) -> Token[TraceContext | _Deferred | None]:
    """Make ``ctx`` current until ``_current.reset(token)`` (iterator-style consumers: the
    event handed out by ``recv()`` stays current until the next one)."""
    return _current.set(ctx)


def use_event(event: Any, peer: str | None = None) -> None:
    """Make ``event`` the current context of this thread/task (no reset: the next consumed
    event replaces it). For ``for event in subscriber:`` loops."""
    _current.set(_of_event(event, peer))


class consuming:  # used like a function: ``with consuming(event):``
    """Run a handler with ``event`` (or a ready ``ctx``) as the current trace context.

    ``with consuming(event) as ctx: handler(event)``. Opens an OpenTelemetry span
    ``"<kind> <name>"`` when the API is installed. A class, not a generator-based context
    manager: this runs once per handled event and @contextmanager costs several µs.
    """

    __slots__ = ("_ctx", "_kind", "_name", "_span", "_token")

    def __init__(self, event: Any = None, *, kind: str = "consume", name: str | None = None,
                 ctx: TraceContext | None = None, peer: str | None = None) -> None:
        self._ctx = ctx if ctx is not None else _of_event(event, peer)
        self._kind = kind
        self._name = name
        self._span: Any = None

    def __enter__(self) -> TraceContext:
        c = self._ctx
        if otel_active():
            self._span = _otel_span(self._kind, self._name or c.stream or "", c)
            entered = self._span.__enter__()
            sc = entered.get_span_context()
            # Children point at the real span, so the backends' trees match. Only a recording
            # span is real: with the API but no SDK, the no-op tracer hands back the *parent's*
            # context, and adopting it would give children the consumed event's span id.
            if sc.is_valid and entered.is_recording():
                c = self._ctx = c._replace(trace_id=f"{sc.trace_id:032x}",
                                           span_id=f"{sc.span_id:016x}",
                                           flags=f"{int(sc.trace_flags):02x}")
        self._token = _current.set(c)
        return c

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._span is not None:
                self._span.__exit__(et, ev, tb)
        finally:
            _current.reset(self._token)


@contextlib.contextmanager
def span(kind: str, name: str) -> Iterator[None]:
    """An OpenTelemetry span for a publish or a request, a child of the current span (a no-op
    without the API)."""
    if not otel_active():
        yield
        return
    tracer = _otel_trace.get_tracer("zeromesh")
    attrs = {"messaging.system": "zeromesh", "messaging.operation": kind,
             "messaging.destination.name": name}
    parent = None
    if not _otel_trace.get_current_span().get_span_context().is_valid:
        # No OTel span is current, but a consumed event's or request's context may be (an
        # `async for` body, a handler run without a consume span): the span continues its
        # trace, under the handler's span, as the traceparent sent without OTel would.
        c = _get()
        if c is not None:
            sc = _SpanContext(int(c.trace_id, 16), int(c.span_id, 16), is_remote=True,
                              trace_flags=_TraceFlags(int(c.flags, 16)))
            parent = _otel_trace.set_span_in_context(_NonRecordingSpan(sc))
    with tracer.start_as_current_span(f"{kind} {name}", context=parent, attributes=attrs):
        yield


def _otel_span(kind: str, name: str, c: TraceContext) -> Any:
    """A started-on-enter OTel span under the consumed message's remote parent."""
    tracer = _otel_trace.get_tracer("zeromesh")
    parent = None
    if c.parent_span_id is not None:
        sc = _SpanContext(int(c.trace_id, 16), int(c.parent_span_id, 16), is_remote=True,
                          trace_flags=_TraceFlags(int(c.flags, 16)))
        parent = _otel_trace.set_span_in_context(_NonRecordingSpan(sc))
    attrs = {"messaging.system": "zeromesh", "messaging.operation": kind,
             "messaging.destination.name": name}
    if c.event_id:
        attrs["messaging.message.id"] = c.event_id
    return tracer.start_as_current_span(f"{kind} {name}", context=parent, attributes=attrs)


def in_context() -> bool:
    """True while a handler runs (a consumed event's trace context is current)."""
    return _current.get() is not None


def child_fields(correlationid: str | None, causationid: str | None,
                 traceparent: str | None) -> tuple[str | None, str | None, str | None]:
    """Fill the unset ones of an outgoing event's fields from the current context.

    One ``ContextVar.get`` when no handler is running; explicit values always win.
    """
    c = _get()
    if c is None:
        return correlationid, causationid, traceparent
    return (correlationid or c.correlationid, causationid or c.causationid,
            traceparent or c.traceparent)


def request_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """Request headers with ``traceparent``, ``correlationid`` and ``causationid`` added from
    the current context (explicit headers win); unchanged outside a handler."""
    c = _current.get()
    if c is not None and type(c) is not TraceContext:
        c = c.resolve()  # type: ignore[union-attr]
    otel_tp = _otel_traceparent() if otel_active() else None
    if c is None and otel_tp is None:
        return dict(headers) if headers is not None else None
    if c is None:
        return {"traceparent": otel_tp or "", **(headers or {})}
    out = {"traceparent": otel_tp or c.traceparent}
    if c.correlationid:
        out["correlationid"] = c.correlationid
    if c.causationid:
        out["causationid"] = c.causationid
    if headers:
        out.update(headers)
    return out


def _otel_traceparent() -> str | None:
    """The current OpenTelemetry span as a traceparent (a request span opened by the client,
    or the user's own span), or None."""
    current = _otel_trace.get_current_span()
    sc = current.get_span_context()
    if not sc.is_valid or not current.is_recording():
        return None  # no SDK (no-op spans echo their parent): keep our own context
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def context_of_request(request_id: str, headers: Mapping[str, str], service: str,
                       peer: str | None = None) -> TraceContext:
    """The context of a service handler serving a request (the request id acts as the
    consumed message's id; the causation is the caller's event when it sent one)."""
    c = context_from(event_id=request_id, traceparent=headers.get("traceparent"),
                     correlationid=headers.get("correlationid"), stream=service, peer=peer)
    return c


def enter_request(request_id: str, headers: Mapping[str, str], service: str,
                  peer: str | None = None) -> Token[TraceContext | _Deferred | None] | None:
    """Make a served request's context current, cheaply; pass the result to :func:`leave`
    when the handler returns. None (nothing done) when OpenTelemetry spans would record: use
    :class:`consuming` then, which opens the "serve" span.

    The context is the one :func:`context_of_request` gives, built only when something reads
    it (:func:`current`, an outgoing request or event, :class:`TraceFilter`), once per
    request: a handler that never looks costs one small object and a ``ContextVar`` set and
    reset instead of about 2 µs.
    """
    if otel_active():
        return None
    return _current.set(_Deferred(request_id, headers, service, peer))


def leave(token: Token[TraceContext | _Deferred | None]) -> None:
    """Restore the context :func:`enter_request` replaced."""
    _current.reset(token)


# --- logging --------------------------------------------------------------------------------


def log_extra(event: Any = None, *, stream: str | None = None,
              peer: str | None = None) -> dict[str, Any]:
    """``extra=`` fields for a log call about ``event``: ``event_id``, ``correlation_id``,
    ``stream``, ``peer`` (None where unknown)."""
    return {
        "event_id": getattr(event, "id", None),
        "correlation_id": (getattr(event, "correlationid", None) or getattr(event, "id", None)),
        "stream": stream if stream is not None else (getattr(event, "stream", None) or None),
        "peer": peer,
    }


class EventLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adapter with fixed fields (e.g. ``stream``, ``peer``) merged into every
    record's ``extra``; pass ``extra=log_extra(event)`` per call for the event's ids."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


class TraceFilter(logging.Filter):
    """Adds ``trace_id``, ``correlation_id``, ``event_id``, ``stream`` and ``peer`` from the
    current context to each record (None outside a handler; values set through ``extra=``
    are kept). Install on a handler: ``handler.addFilter(TraceFilter())``; then a format
    like ``"%(message)s cid=%(correlation_id)s"`` works everywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        c = _get()
        for attr, val in (("trace_id", c.trace_id if c else None),
                          ("correlation_id", c.correlationid if c else None),
                          ("event_id", c.event_id if c else None),
                          ("stream", c.stream if c else None),
                          ("peer", c.peer if c else None)):
            if not hasattr(record, attr):
                setattr(record, attr, val)
        return True
