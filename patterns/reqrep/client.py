"""The caller side (sync): ``client.request("thumbs", payload, timeout=2.0)``.

Sockets: each calling thread gets its own ROUTER (created on first use, closed with the client),
connected to every responder of the names it calls; the service ROUTERs carry a routing id of
``<node id>/<name>`` so one socket addresses each responder precisely (the zguide's Freelance
model 3). The calling thread sends, polls and receives itself: no thread hop on the hot path.
Retries, failover and heartbeats are decided by :class:`~patterns.reqrep.call.Call`; the
responder table is shared by all threads and kept current from ``node.who_offers`` and
``node.on_peer`` events.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from mesh import tracing
from mesh.errors import ClosedError, ConfigError, ProtocolError
from mesh.peers import PeerEvent, PeerEventKind, PeerInfo
from mesh.tracing import request_headers
from mesh.uuid7 import uuid7
from patterns._closing import close_with
from patterns._metrics import attach, client_collector
from patterns.reqrep import frames as fr
from patterns.reqrep._zio import MORE_NB as _MORE_NB
from patterns.reqrep._zio import NB as _NB
from patterns.reqrep._zio import readable, recv_frames, send_frames
from patterns.reqrep._zio import zsend as _zsend
from patterns.reqrep.balancer import Balancer
from patterns.reqrep.call import Call, CallConfig, Ping, Send
from patterns.reqrep.errors import RequestTimeout
from patterns.reqrep.retry import Backoff
from patterns.reqrep.service import decode_body, encode_body, routing_id, service_role

__all__ = [
    "Client",
    "ClientConfig",
    "ClientCore",
    "ClientStats",
    "Responders",
    "Wire",
    "finish_call",
    "prepare_call",
    "stats_of",
]

log = logging.getLogger(__name__)
_yield = os.sched_yield

_BYTES = fr.Format.BYTES
_MAX_WAIT_S = 0.05  # re-check the responder table at least this often while waiting
_MAX_HOLDERS = 4096  # timed-out request ids remembered with their responder, for retries


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a client.

    Attributes:
        timeout: default total deadline of a request, in seconds.
        heartbeat_s: PING interval to the responder holding a request.
        liveness: missed heartbeats after which a responder is marked silent: new requests
            avoid it, but a request it holds stays with it (silence is not death; see
            :mod:`patterns.reqrep.call`).
        silent_s: how long a silent responder is skipped (unless it is heard from again).
        backoff: waits after BUSY replies and failed sends.
        retry_on_death: when the responder holding a request dies, send the request to
            another responder (set it only for idempotent handlers) instead of raising
            :class:`~patterns.reqrep.errors.OutcomeUnknown`.
        spin_us: latency mode of the sync :class:`Client` (off by default): while waiting
            for a reply the calling thread first polls without blocking for up to this many
            microseconds, so a reply arriving then is read without a wake-up from sleep, at
            the cost of a busy core while it spins. The asyncio client ignores it (spinning
            would stall its event loop).
    """

    timeout: float = 5.0
    heartbeat_s: float = 0.2
    liveness: int = 3
    silent_s: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    retry_on_death: bool = False
    spin_us: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.spin_us, int) or not 0 <= self.spin_us <= 1_000_000:
            raise ConfigError(f"spin_us must be an int in [0, 1000000], got {self.spin_us!r}")

    def call_config(self) -> CallConfig:
        """The per-call timing derived from these settings."""
        return CallConfig(self.heartbeat_s, self.liveness, self.backoff,
                          retry_on_death=self.retry_on_death)


@dataclass
class ClientStats:
    """Counters of a client (a snapshot)."""

    requests: int = 0
    replies: int = 0
    remote_errors: int = 0
    timeouts: int = 0
    no_responders: int = 0
    retries: int = 0
    failovers: int = 0
    late_replies: int = 0
    garbage: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    batches_received: int = 0
    batches_sent: int = 0


class Responders:
    """Who offers which service, shared by all threads of a client (guarded by ``lock``)."""

    def __init__(self, node: Any, silent_s: float, clock: Callable[[], float]) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.clock = clock
        self.silent_s = silent_s
        self.generation = 0
        #: service -> node id -> (endpoint, CURVE key it is dialled with): a responder back on
        #: the same endpoint with another key (a rotation; data ports come from a range) needs
        #: a new connection, or libzmq retries the old handshake forever.
        self.endpoints: dict[str, dict[str, tuple[str, str | None]]] = {}
        self.balancers: dict[str, Balancer] = {}
        # (service, request id) -> responder that held it when its call timed out, so a retry
        # with the same id goes back there (its reply cache knows the id; another would run it)
        self._holders: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._unsubscribe = node.on_peer(self._on_peer)

    def track(self, service: str) -> Balancer:
        """Start following ``service`` (idempotent); returns its balancer."""
        bal = self.balancers.get(service)  # a dict read is atomic: no lock once it exists
        if bal is not None:
            return bal
        with self.lock:
            bal = self.balancers.get(service)
            if bal is not None:
                return bal
            bal = self.balancers[service] = Balancer(self.clock, self.silent_s)
            self.endpoints[service] = {}
        for info in self.node.who_offers("service", service):
            self._upsert(info)
        return bal

    def _upsert(self, info: PeerInfo) -> None:
        offered = set(info.offers.get("service", ()))
        with self.lock:
            for service, eps in self.endpoints.items():
                bal = self.balancers[service]
                # Security: a responder not allowed to "serve" this service is never used.
                ep = (self.node.connect_endpoint(info, service_role(service))
                      if service in offered
                      and self.node.permits(info.node_id, "serve", service) else None)
                if ep is None:
                    if eps.pop(info.node_id, None) is not None:
                        bal.remove(info.node_id)
                        self.generation += 1
                    continue
                target = (ep, info.public_key)
                if eps.get(info.node_id) != target:
                    eps[info.node_id] = target
                    self.generation += 1
                bal.add(info.node_id)  # a (re)announcement makes a silent responder usable

    def _remove(self, node_id: str) -> None:
        with self.lock:
            for service, eps in self.endpoints.items():
                if eps.pop(node_id, None) is not None:
                    self.balancers[service].remove(node_id)
                    self.generation += 1

    def _on_peer(self, ev: PeerEvent) -> None:
        # reactor thread: only table updates here, never socket work
        if ev.kind in (PeerEventKind.JOINED, PeerEventKind.CHANGED):
            self._upsert(ev.peer)
        elif ev.kind == PeerEventKind.LEFT:
            self._remove(ev.peer.node_id)

    def prefer(self, call: Call) -> None:
        """Point a new call at the responder that held its id when an earlier call with the
        same id timed out (if that responder is still present)."""
        if self._holders:
            with self.lock:
                call.prefer = self._holders.pop((call.service, call.id), None)

    def remember(self, call: Call) -> None:
        """After a call ends: keep who held it if it timed out (bounded, oldest forgotten)."""
        if call.responder is not None and isinstance(call.error, RequestTimeout):
            with self.lock:
                self._holders[(call.service, call.id)] = call.responder
                while len(self._holders) > _MAX_HOLDERS:
                    self._holders.popitem(last=False)

    def snapshot(self) -> tuple[int, dict[bytes, tuple[str, str | None]]]:
        """(generation, routing id -> (endpoint, key)) of every responder of every tracked
        service."""
        with self.lock:
            out = {routing_id(nid, svc): ep
                   for svc, eps in self.endpoints.items() for nid, ep in eps.items()}
            return self.generation, out

    def close(self) -> None:
        """Stop following peer events."""
        self._unsubscribe()


class Wire:
    """One ROUTER socket of a client, used by one thread (or one event loop) only."""

    def __init__(self, node: Any, responders: Responders) -> None:
        self.responders = responders
        self.sock = node.socket(zmq.ROUTER, "rpc-client")
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable -> error, not a silent drop
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted responder takes its id back
        # IMMEDIATE: a pipe exists only while its connection does, so when a responder's process
        # dies (the kernel closes its sockets) its routing id becomes unroutable at once and
        # the next PING fails: that is the client's evidence of death. Without it the pipe
        # outlives the connection (libzmq keeps it for the reconnect) and PINGs queue silently.
        # A SIGSTOPped or GIL-bound responder keeps its connection, so it keeps its requests.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.owner = threading.get_ident()
        self.generation = -1
        self.connected: dict[bytes, tuple[str, str | None]] = {}  # rid -> (endpoint, key)
        self.nonce = 0
        # poll(2) on ZMQ_FD, after ZMQ_EVENTS said nothing waits (see Client._run)
        self.poller = select.poll()
        self.poller.register(self.sock.getsockopt(zmq.FD), select.POLLIN)
        # one reply at most this big in all its frames (MAXMSGSIZE bounds each frame only)
        self.max_bytes = node.config.max_message_bytes + (64 << 10)
        self._rids: dict[tuple[str, str], bytes] = {}
        # Data-socket bytes; plain ints: only the owning thread writes them.
        self.bytes_in = 0
        self.bytes_out = 0

    def sync(self) -> None:
        """Connect to new responders, disconnect from gone ones."""
        gen = self.responders.generation
        if gen == self.generation:
            return
        self.generation, want = self.responders.snapshot()
        for rid, target in list(self.connected.items()):
            if want.get(rid) != target:
                try:
                    self.sock.disconnect(target[0])
                except zmq.ZMQError:
                    pass
                del self.connected[rid]
        for rid, target in want.items():
            if rid not in self.connected:
                try:
                    self.sock.connect(target[0])
                except zmq.ZMQError as exc:
                    log.warning("rpc client: cannot connect to %s: %s", target[0], exc)
                    continue
                self.connected[rid] = target

    def send(self, service: str, call: Call, action: Send | Ping, req: fr.Request) -> bool:
        """Send a REQUEST or PING; False when the responder is not routable."""
        rid, frames = self.frames_of(service, call, action, req)
        return self.send_raw(rid, frames)

    def frames_of(self, service: str, call: Call, action: Send | Ping,
                  req: fr.Request) -> tuple[bytes, list[bytes]]:
        """(routing id, frames) of the REQUEST or PING ``action`` asks for."""
        key = (action.responder, service)
        rid = self._rids.get(key)
        if rid is None:
            rid = self._rids[key] = routing_id(action.responder, service)
        if type(action) is Send:
            ttl = int((call.deadline - self.responders.clock()) * 1000)
            return rid, fr.request_frames(req, ttl if ttl > 0 else 0, action.attempt)
        self.nonce += 1
        return rid, fr.encode_ping(fr.Ping(self.nonce, call.id))

    def send_raw(self, rid: bytes, frames: list[bytes]) -> bool:
        """Send ``frames`` to the responder ``rid``; False when it is not routable."""
        try:
            if len(frames) == 1:  # the compact form: two frames with the routing id
                f = frames[0]
                _zsend(self.sock, rid, _MORE_NB)
                _zsend(self.sock, f, _NB)
                self.bytes_out += len(rid) + len(f)
                return True
            send_frames(self.sock, [rid, *frames])
            nb = len(rid)
            for f in frames:
                nb += len(f)
            self.bytes_out += nb
            return True
        except zmq.ZMQError:
            return False  # EHOSTUNREACH (not connected yet / gone) or EAGAIN (queue full)

    def close(self) -> None:
        """Close the socket (no linger: pending requests are the caller's to retry)."""
        self.sock.close(0)


def _finished(call: Call) -> bool:
    # a function, so type checkers do not carry a narrowed ``call.done`` across the receive
    return call.done


_NAMES: dict[bytes, str] = {}  # routing id -> node id, for the few responders a process calls


def responder_of(rid: bytes) -> str:
    """The node id part of a service routing id."""
    name = _NAMES.get(rid)
    if name is None:
        name = rid.split(b"/", 1)[0].decode("ascii", "replace")
        if len(_NAMES) >= 4096:  # bounded: routing ids come from the network
            _NAMES.clear()
        _NAMES[rid] = name
    return name


def prepare_call(service: str, payload: Any, timeout: float | None, headers: dict[str, str] | None,
                 correlationid: str | None, traceparent: str | None, request_id: str | None, *,
                 config: ClientConfig, call_config: CallConfig, now: float,
                 stats: collections.Counter[str]) -> tuple[Call, fr.Request]:
    """Validate a request and build its :class:`Call` and frame template (both clients).

    Raises:
        ConfigError: bad timeout, service name, headers or payload.
    """
    t = config.timeout if timeout is None else timeout
    if not isinstance(t, (int, float)) or not t > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {t!r}")
    if not isinstance(service, str) or not service:
        raise ConfigError(f"service must be a non-empty string, got {service!r}")
    # Inside a handler the consumed event's trace context fills the unset trace headers.
    h = request_headers(headers) or {}
    if correlationid is not None:
        h["correlationid"] = correlationid
    if traceparent is not None:
        h["traceparent"] = traceparent
    if h and not all(isinstance(k, str) and isinstance(v, str) for k, v in h.items()):
        raise ConfigError("headers must map strings to strings")
    fmt, body = encode_body(payload)
    rid = request_id or uuid7()
    stats["requests"] += 1
    return Call(rid, service, float(t), now, call_config), fr.Request(rid, service, 0, 0, fmt, h,
                                                                        body)


def finish_call(call: Call, stats: collections.Counter[str]) -> Any:
    """Count the outcome of a finished call; return the decoded reply or raise its error.

    Raises:
        MeshError: the call's error (RemoteError, NoResponders, RequestTimeout...).
    """
    # A durable request ends several rounds of one call: count only what is new this round.
    retries, failovers = max(0, call.attempts - 1), call.failovers
    counted = call.counted
    if retries != counted[0] or failovers != counted[1]:  # rare: no dict writes otherwise
        stats["retries"] += retries - counted[0]
        stats["failovers"] += failovers - counted[1]
        call.counted = (retries, failovers)
    if call.error is not None:
        stats[type(call.error).__name__] += 1
        raise call.error
    rep = call.reply
    assert rep is not None
    stats["replies"] += 1
    if rep.format is _BYTES:
        return rep.body
    return decode_body(rep.format, rep.body)


def stats_of(s: collections.Counter[str]) -> ClientStats:
    """The counters as a :class:`ClientStats`."""
    return ClientStats(
        requests=s["requests"], replies=s["replies"], remote_errors=s["RemoteError"],
        timeouts=s["RequestTimeout"], no_responders=s["NoResponders"],
        retries=s["retries"], failovers=s["failovers"], late_replies=s["late_replies"],
        garbage=s["garbage"], bytes_in=s["bytes_in"], bytes_out=s["bytes_out"],
        batches_received=s["batches_received"], batches_sent=s["batches_sent"])


class ClientCore:
    """What :class:`Client` and the asyncio client share: settings, the responder table,
    the counters.

    Raises:
        ConfigError: bad settings.
    """

    def __init__(self, node: Any, config: ClientConfig | None,
                 overrides: dict[str, Any]) -> None:
        cfg = config or ClientConfig()
        if overrides:
            cfg = ClientConfig(**{**cfg.__dict__, **overrides})
        self.node = node
        self.config = cfg
        self._call_cfg = cfg.call_config()
        self._clock = time.monotonic
        self.responders = Responders(node, cfg.silent_s, self._clock)
        self._stats: collections.Counter[str] = collections.Counter()
        self._closed = False


class Client(ClientCore):
    """Calls services by name; usable from any number of threads.

    Args:
        node: the mesh node.
        config: settings; keyword arguments override its fields.

    Raises:
        ConfigError: bad settings.
    """

    def __init__(self, node: Any, *, config: ClientConfig | None = None,
                 **overrides: Any) -> None:
        super().__init__(node, config, overrides)
        self._local = threading.local()
        self._wires: list[Wire] = []
        self._wires_lock = threading.Lock()
        self._unmetrics = attach(node, client_collector(self))
        self._unclose = close_with(node, self.close)  # node.close() closes it first

    def _wire(self) -> Wire:
        w: Wire | None = getattr(self._local, "wire", None)
        if w is None:
            w = Wire(self.node, self.responders)
            self._local.wire = w
            with self._wires_lock:
                self._wires.append(w)
        return w

    def request(self, service: str, payload: Any, *, timeout: float | None = None,
                headers: dict[str, str] | None = None, correlationid: str | None = None,
                traceparent: str | None = None, request_id: str | None = None) -> Any:
        """Call ``service`` with ``payload`` (bytes, or any msgpack value); return the reply.

        Args:
            service: the service name.
            payload: bytes (passed untouched) or a msgpack-serialisable value.
            timeout: total deadline in seconds (default ``config.timeout``).
            headers: extra string headers.
            correlationid: sets the ``correlationid`` header.
            traceparent: sets the ``traceparent`` header (W3C trace context).
            request_id: a caller-chosen id (default a new UUIDv7); the same id is never
                executed twice by a responder within its cache window.

        Raises:
            RemoteError: the handler raised (``.type``, ``.message``).
            ServiceBusy: every responder refused for lack of capacity until the deadline.
            NoResponders: no responder was found before the deadline.
            RequestTimeout: responders were tried but no reply came before the deadline; the
                request may or may not have run. Retry with the same ``request_id``: the
                responder holding it answers from its reply cache instead of running it again.
            OutcomeUnknown: the responder holding the request died before replying (it may or
                may not have taken effect); not sent elsewhere unless ``retry_on_death``.
            ConfigError: bad timeout, payload or headers.
            ClosedError: the client is closed.
        """
        if self._closed:
            raise ClosedError("rpc client is closed")
        if tracing.otel_active():  # a "request" span, parent of the traceparent header sent
            with tracing.span("request", service):
                return self._request(service, payload, timeout, headers, correlationid,
                                     traceparent, request_id)
        call, req = prepare_call(service, payload, timeout, headers, correlationid,
                                 traceparent, request_id, config=self.config,
                                 call_config=self._call_cfg, now=self._clock(),
                                 stats=self._stats)
        return self._call(call, req)

    def _request(self, service: str, payload: Any, timeout: float | None,
                 headers: dict[str, str] | None, correlationid: str | None,
                 traceparent: str | None, request_id: str | None) -> Any:
        call, req = prepare_call(service, payload, timeout, headers, correlationid,
                                 traceparent, request_id, config=self.config,
                                 call_config=self._call_cfg, now=self._clock(),
                                 stats=self._stats)
        return self._call(call, req)

    def _call(self, call: Call, req: fr.Request) -> Any:
        """Run a prepared (or reopened, see :meth:`Call.extend`) call to its end."""
        bal = self.responders.track(call.service)
        wire = self._wire()
        if not call.ever_sent:
            self.responders.prefer(call)
        try:
            self._run(wire, bal, call, req)
        finally:  # every end of a call gives back its in-flight slot (timeout, close, error)
            if call._held is not None:  # a reply released it already (this thread's call)
                with self.responders.lock:
                    call.release(bal)
            if call.error is not None:
                self.responders.remember(call)
        return finish_call(call, self._stats)

    def _act(self, wire: Wire, bal: Balancer, call: Call, req: fr.Request,
             actions: list[Send | Ping]) -> None:
        for a in actions:
            rid, frames = wire.frames_of(call.service, call, a, req)
            if not wire.send_raw(rid, frames):
                now = self._clock()
                with self.responders.lock:
                    if isinstance(a, Ping):
                        # its connection is gone (ROUTER_MANDATORY): evidence of death
                        bal.mark_silent(a.responder)
                        call.on_lost(a.responder, now, bal)
                    else:
                        call.on_send_failed(a.responder, now, bal)

    def _run(self, wire: Wire, bal: Balancer, call: Call, req: fr.Request) -> None:
        if wire.owner != threading.get_ident():
            raise ClosedError("a client wire was used from a thread that does not own it")
        sock = wire.sock
        lock = self.responders.lock
        spin = self.config.spin_us / 1e6
        responders = self.responders
        while True:
            if wire.generation != responders.generation:
                wire.sync()
            now = self._clock()
            with lock:
                actions = call.step(now, bal)
            if actions:  # then straight to the wait: wake_at() says when to step again
                self._act(wire, bal, call, req, actions)
            if call.done:
                return
            if self._closed:
                raise ClosedError("rpc client closed during a request")
            wait = min(call.wake_at() - now, _MAX_WAIT_S)
            # ZMQ_FD only says that something may have changed: ZMQ_EVENTS (readable) is the
            # last socket operation before blocking on it (a send may have taken the signal).
            # One poll(2) instead of zmq_poll's two passes with ZMQ_EVENTS after each.
            if wait > 0 and not readable(sock):
                got = False
                if spin:  # latency mode: a bounded busy-poll before sleeping
                    end = now + min(spin, wait)
                    while True:
                        if readable(sock):
                            got = True
                            break
                        if self._clock() >= end:
                            break
                        _yield()  # let this core's other threads (libzmq's I/O) run
                if not got and not wire.poller.poll(max(1, int(wait * 1000 + 0.999))):
                    continue
            for _ in range(256):
                msg = recv_frames(sock, wire.max_bytes)  # [] if oversize: garbage
                if msg is None:
                    break
                nb = 0
                for f in msg:
                    nb += len(f)
                wire.bytes_in += nb
                self._on_message(wire, bal, call, req, msg)
                if _finished(call):
                    return

    def _on_message(self, wire: Wire, bal: Balancer, call: Call, req: fr.Request,
                    msg: list[bytes]) -> None:
        got = fr.decode_compact(msg[1]) if len(msg) == 2 else None
        if got is not None:  # a well-formed compact REPLY or REQUEST (checked as decode does)
            m: fr.Message = got[0]
        else:
            try:
                m = fr.decode(msg[1:])
            except ProtocolError:
                self._stats["garbage"] += 1
                return
        responder = responder_of(msg[0])
        if type(m) is fr.Reply and m.id == call.id:  # the reply awaited: _on_one's first case
            now = self._clock()
            with self.responders.lock:
                call.on_reply(responder, m, now, bal)
            return
        if isinstance(m, fr.Batch):
            self._stats["batches_received"] += 1
            self._stats["garbage"] += m.malformed
            for item in m.items:
                if isinstance(item, fr.Reply):
                    self._on_one(wire, bal, call, req, responder, item)
                else:
                    self._stats["garbage"] += 1  # REQUESTs sent to a caller
            return
        self._on_one(wire, bal, call, req, responder, m)

    def _on_one(self, wire: Wire, bal: Balancer, call: Call, req: fr.Request, responder: str,
                m: fr.Request | fr.Reply | fr.Ping | fr.Pong) -> None:
        now = self._clock()
        if type(m) is fr.Reply:
            with self.responders.lock:
                if m.id == call.id:
                    call.on_reply(responder, m, now, bal)
                    return
                bal.heard(responder, m.free)
            self._stats["late_replies"] += 1  # an earlier request this thread gave up on
        elif isinstance(m, fr.Pong):
            resend: Send | None = None
            with self.responders.lock:
                if m.request_id == call.id:
                    resend = call.on_pong(responder, m, now, bal)
                else:
                    bal.heard(responder, m.free)
            if resend is not None:
                self._act(wire, bal, call, req, [resend])
        else:
            self._stats["garbage"] += 1

    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        s = stats_of(self._stats)
        with self._wires_lock:
            for w in self._wires:
                s.bytes_in += w.bytes_in
                s.bytes_out += w.bytes_out
        return s

    def close(self) -> None:
        """Close every socket of the client. Requests still running raise ClosedError soon
        after (they re-check within 50 ms); call it once no thread is inside ``request``."""
        if self._closed:
            return
        self._closed = True
        self._unmetrics()
        self._unclose()
        self.responders.close()
        with self._wires_lock:
            wires, self._wires = self._wires, []
            for w in wires:  # kept in the totals after the sockets are gone
                self._stats["bytes_in"] += w.bytes_in
                self._stats["bytes_out"] += w.bytes_out
        for w in wires:
            w.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
