"""The asyncio twin of :class:`~patterns.reqrep.client.Client`: ``await aclient.request(...)``.

One ROUTER per :class:`AsyncClient`, owned by its event loop's thread. The socket's FD is
watched with ``loop.add_reader``; each wake-up drains every waiting message (ZeroMQ's FD is
edge-triggered, so the drain runs until ``EVENTS`` shows nothing left) and resolves the futures
of the calls they answer: one loop callback per batch, not one await per message. Many
requests may be in flight at once; each is the same pure :class:`~patterns.reqrep.call.Call`
as in the sync client.

Requests batch: while several calls are pending, a REQUEST to a responder whose latest message
showed ``rev`` >= :data:`~patterns.reqrep.frames.BATCH_REVISION` waits in an outbox until the
loop's next pass, and the REQUESTs gathered there for one responder leave in one BATCH
(docs/protocol.md, "Batches"). A lone call is sent at once: batching never delays it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import zmq

from mesh.errors import ClosedError, ProtocolError
from patterns._metrics import attach, client_collector
from patterns.reqrep import frames as fr
from patterns.reqrep._zio import readable, recv_frames
from patterns.reqrep.call import Call, Ping, Send
from patterns.reqrep.client import (
    ClientConfig,
    ClientCore,
    ClientStats,
    Wire,
    finish_call,
    prepare_call,
    responder_of,
    stats_of,
)

__all__ = ["AsyncClient"]


@dataclass(slots=True)
class _Pending:
    call: Call
    req: fr.Request
    waker: asyncio.Future[None] | None = None
    wake_at: float = 0.0  #: clock value at which the waiting call must step again


class AsyncClient(ClientCore):
    """Calls services by name from asyncio; create and use it on one event loop.

    Args:
        node: the mesh node.
        config: settings; keyword arguments override its fields.
    """

    def __init__(self, node: Any, *, config: ClientConfig | None = None,
                 **overrides: Any) -> None:
        super().__init__(node, config, overrides)
        self._wire: Wire | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}
        self._drain_scheduled = False
        # One timer for the whole client, armed at the earliest wake-up of any waiting call:
        # a call_later per request (and its cancel) was a heap push and a handle per request.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._unmetrics = attach(node, client_collector(self))
        #: responder routing ids whose latest message showed a rev that reads BATCHes
        self._batch_peers: set[bytes] = set()
        #: REQUESTs waiting for the flush: routing id -> [(pending call, action, frame)]
        self._outbox: dict[bytes, list[tuple[_Pending, Send, bytes]]] = {}
        self._flush_scheduled = False

    def _start(self) -> Wire:
        loop = asyncio.get_running_loop()
        if self._wire is None:
            self._loop = loop
            self._wire = Wire(self.node, self.responders)
            loop.add_reader(self._wire.sock.getsockopt(zmq.FD), self._drain)
        elif loop is not self._loop:
            raise ClosedError("an AsyncClient is bound to the event loop that first used it")
        return self._wire

    async def request(self, service: str, payload: Any, *, timeout: float | None = None,
                      headers: dict[str, str] | None = None, correlationid: str | None = None,
                      traceparent: str | None = None, request_id: str | None = None) -> Any:
        """Call ``service``; the same arguments, result and errors as
        :meth:`patterns.reqrep.client.Client.request`.

        Raises:
            RemoteError: the handler raised.
            ServiceBusy: every responder refused for lack of capacity until the deadline.
            NoResponders: no responder was found before the deadline.
            RequestTimeout: no reply before the deadline.
            ConfigError: bad timeout, payload or headers.
            ClosedError: the client is closed.
        """
        if self._closed:
            raise ClosedError("rpc client is closed")
        call, req = prepare_call(service, payload, timeout, headers, correlationid,
                                 traceparent, request_id, config=self.config,
                                 call_config=self._call_cfg, now=self._clock(),
                                 stats=self._stats)
        bal = self.responders.track(service)
        wire = self._start()
        self.responders.prefer(call)
        loop = asyncio.get_running_loop()
        pend = self._pending[call.id] = _Pending(call, req)
        try:
            while not call.done:  # a reply that woke this task ends it without another step
                wire.sync()
                now = self._clock()
                with self.responders.lock:
                    actions = call.step(now, bal)
                if actions:  # then straight to the wait: wake_at() says when to step again
                    self._act(wire, call, req, actions)
                if _finished(call):
                    break
                if self._closed:
                    raise ClosedError("rpc client closed during a request")
                fut: asyncio.Future[None] = loop.create_future()
                pend.waker = fut
                pend.wake_at = at = min(call.wake_at(), now + 0.05)
                if at < self._timer_at:
                    self._arm(loop, at, now)
                try:
                    await fut
                finally:
                    pend.waker = None
        finally:  # cancelled, closed or done: give back the in-flight slot
            del self._pending[call.id]
            if call._held is not None:  # else a reply released it already (this loop's call)
                with self.responders.lock:
                    call.release(bal)
            if call.error is not None:
                self.responders.remember(call)
        return finish_call(call, self._stats)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(loop.time() + max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._closed or self._loop is None:
            return
        now = self._clock()
        nxt = float("inf")
        for pend in self._pending.values():
            if pend.waker is None:
                continue
            if pend.wake_at <= now:
                _wake(pend.waker)
            elif pend.wake_at < nxt:
                nxt = pend.wake_at
        if nxt != float("inf"):
            self._arm(self._loop, nxt, now)

    def _act(self, wire: Wire, call: Call, req: fr.Request, actions: list[Send | Ping]) -> None:
        bal = self.responders.balancers[call.service]
        for a in actions:
            rid, frames = wire.frames_of(call.service, call, a, req)
            if (isinstance(a, Send) and len(frames) == 1 and len(self._pending) > 1
                    and rid in self._batch_peers and self._loop is not None):
                pend = self._pending.get(call.id)
                if pend is not None:
                    box = self._outbox.get(rid)
                    if box is None:
                        box = self._outbox[rid] = []
                    box.append((pend, a, frames[0]))
                    if not self._flush_scheduled:
                        self._flush_scheduled = True
                        self._loop.call_soon(self._flush)
                    continue
            if not wire.send_raw(rid, frames):
                now = self._clock()
                with self.responders.lock:
                    if isinstance(a, Ping):
                        bal.mark_silent(a.responder)
                        call.on_lost(a.responder, now, bal)
                    else:
                        call.on_send_failed(a.responder, now, bal)
        # a send can consume the FD's edge: look for already-queued replies soon
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _flush(self) -> None:
        """Send the outbox: one BATCH per responder where several REQUESTs wait for it."""
        self._flush_scheduled = False
        box, self._outbox = self._outbox, {}
        wire = self._wire
        if wire is None or self._closed:
            return
        for rid, items in box.items():
            chunk: list[tuple[_Pending, Send, bytes]] = []
            size = 0
            for it in items:
                if it[0].call.done:  # ended (deadline, close) since it was queued: not sent
                    continue
                if chunk and (len(chunk) >= fr.BATCH_MAX_ITEMS
                              or size + len(it[2]) > fr.BATCH_MAX_BYTES):
                    self._emit(wire, rid, chunk)
                    chunk, size = [], 0
                chunk.append(it)
                size += len(it[2])
            if chunk:
                self._emit(wire, rid, chunk)
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _emit(self, wire: Wire, rid: bytes, chunk: list[tuple[_Pending, Send, bytes]]) -> None:
        if len(chunk) == 1:
            ok = wire.send_raw(rid, [chunk[0][2]])
        else:
            ok = wire.send_raw(rid, [fr.batch_frame(fr.Command.REQUEST,
                                                    [it[2] for it in chunk])])
            if ok:
                self._stats["batches_sent"] += 1
        if ok:
            return
        now = self._clock()
        for pend, a, _f in chunk:  # none of them left: each call backs off and chooses again
            call = pend.call
            if call.done:
                continue
            bal = self.responders.balancers[call.service]
            with self.responders.lock:
                call.on_send_failed(a.responder, now, bal)
            if pend.waker is not None:
                _wake(pend.waker)

    def _drain(self) -> None:
        self._drain_scheduled = False
        wire = self._wire
        if wire is None or self._closed:
            return
        sock = wire.sock
        while readable(sock):
            while True:
                msg = recv_frames(sock, wire.max_bytes)  # [] if oversize: garbage
                if msg is None:
                    break
                nb = 0
                for f in msg:
                    nb += len(f)
                wire.bytes_in += nb
                self._on_message(wire, msg)

    def _on_message(self, wire: Wire, msg: list[bytes]) -> None:
        try:
            m, rev = fr.decode_after_id(msg)
        except ProtocolError:
            self._stats["garbage"] += 1
            return
        rid = msg[0]
        if rev >= fr.BATCH_REVISION and len(msg) == 2:
            if rid not in self._batch_peers and len(self._batch_peers) < 65536:
                self._batch_peers.add(rid)
        elif self._batch_peers:
            self._batch_peers.discard(rid)
        responder = responder_of(rid)
        if isinstance(m, fr.Batch):
            self._stats["batches_received"] += 1
            self._stats["garbage"] += m.malformed
            for item in m.items:
                if isinstance(item, fr.Reply):
                    self._on_one(wire, responder, item)
                else:
                    self._stats["garbage"] += 1  # REQUESTs sent to a caller
            return
        self._on_one(wire, responder, m)

    def _on_one(self, wire: Wire, responder: str,
                m: fr.Request | fr.Reply | fr.Ping | fr.Pong) -> None:
        if isinstance(m, (fr.Reply, fr.Pong)):
            pend = self._pending.get(m.id if isinstance(m, fr.Reply) else m.request_id)
            now = self._clock()
            if pend is None:
                if isinstance(m, fr.Reply):
                    self._stats["late_replies"] += 1
                return
            call = pend.call
            bal = self.responders.balancers[call.service]
            resend: Send | None = None
            with self.responders.lock:
                if isinstance(m, fr.Reply):
                    call.on_reply(responder, m, now, bal)
                else:
                    resend = call.on_pong(responder, m, now, bal)
            if resend is not None:
                self._act(wire, call, pend.req, [resend])
            if call.done and pend.waker is not None:
                _wake(pend.waker)
        else:
            self._stats["garbage"] += 1

    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        s = stats_of(self._stats)
        if self._wire is not None:
            s.bytes_in += self._wire.bytes_in
            s.bytes_out += self._wire.bytes_out
        return s

    async def aclose(self) -> None:
        """Close the socket; calls in flight end with ClosedError within 50 ms."""
        self.close()

    def close(self) -> None:
        """Close the socket (call from the loop's thread). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._unmetrics()
        self.responders.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._wire is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._wire.sock.getsockopt(zmq.FD))
            self._wire.close()
        for pend in self._pending.values():
            if pend.waker is not None:
                _wake(pend.waker)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _finished(call: Call) -> bool:
    # a function, so type checkers do not carry a narrowed ``call.done`` across ``_act``
    return call.done


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

