"""The control channel's I/O (docs/protocol.md): links, HELLO sending, flushing, receiving,
presence ticks and gossip. Reactor thread only, but for sending (:meth:`ControlChannel.send`
queues for the reactor; :meth:`ControlChannel.send_now` sends from the calling thread under
the lock every use of a link's socket holds).

Gossip (docs/protocol.md, "Gossip"): every 10 heartbeats a node sends each peer an 8-byte
digest of its view (a full list only to peers too old to read one); a mismatch is answered
with the node's bucket hashes (control 1.3: the peer answers with the entries of the buckets
that differ and a want of them), or with a full list and a pull request to a 1.2 peer; a node
that joins through us gets the full list and the other peers just its entry. The decisions are
:class:`mesh.gossip.Gossip`'s.

A bound ROUTER receives everything; to talk to a peer the node connects one DEALER (routing
id = our node id + random bytes, one per connection) to the peer's control endpoint: a
:class:`Link`. HELLO / UPDATE / PING / PONG / GOSSIP / BYE are handled here; other kinds go to
the handlers registered with :meth:`mesh.node.Node.handle`. Who may speak for a node id is
decided by :class:`mesh.membership.Membership`; this module carries its decisions out.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import zmq

from mesh import control
from mesh import gossip as gsp
from mesh.budget import Budget
from mesh.control import Hello
from mesh.datadir import NODE_ID_RE
from mesh.errors import (
    AuthenticationFailed,
    ClosedError,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    UnsupportedProtocol,
)
from mesh.membership import Claim, Membership
from mesh.peers import PeerInfo, PeerState
from mesh.reactor import Timer
from mesh.transport import choose_endpoint, recv_bounded

if TYPE_CHECKING:
    from mesh.node import Node

__all__ = ["ControlChannel", "Link"]

#: Multiparts drained from the control ROUTER per reactor turn (fairness with other sockets).
_RECV_BATCH = 1000
#: (header, body) pairs per outgoing multipart.
SEND_BATCH = 256
#: Messages node.send() may queue for the reactor before it drops (and counts) more.
_MAX_OUTQ = 100_000
#: A gossip round (a digest to each peer, a full list to an old one) once per this many
#: heartbeats; joins send the newcomer's entry at once.
_GOSSIP_EVERY = 10
#: At most one full list per peer per this many heartbeats (a digest or pull flood from an
#: admitted peer cannot make the node send more; what is owed goes at the next allowed tick).
_PUSH_EVERY = 3
#: At most this many full lists per heartbeat in all (many nodes joining at once).
_PUSH_PER_TICK = 8
#: Random bytes after the node id in a control DEALER's routing id (one per connection).
_RID_SUFFIX = 8
#: Room for headers and the routing id above max_message_bytes in one control multipart.
_MSG_SLACK = 64 << 10


class Link:
    """Our DEALER to one peer's control ROUTER, with its outgoing batch."""

    __slots__ = ("created", "endpoint", "full", "last_sent", "node_id", "origin", "out", "sock",
                 "static", "token", "verified")

    def __init__(
        self, sock: zmq.Socket[Any], endpoint: str, token: int, node_id: str | None,
        static: str | None, now: float,
    ) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.token = token
        self.node_id = node_id  # None while a static/seed dial has not been answered
        self.static = static  # the configured endpoint this link serves (redialled when gone)
        self.last_sent = 0.0
        self.created = now
        self.out: list[tuple[str, bytes]] = []
        self.full = False  # the last send hit the HWM (the peer does not read)
        #: the peer answered on this link (a PONG echoing its token, or a HELLO acking it):
        #: only such peers are gossiped on
        self.verified = False
        #: what made this dial (budget key of ``ControlChannel.dial_budget``), None when not
        #: charged
        self.origin: object = None


def rid_node(ident: bytes) -> str | None:
    """The node id a control routing id starts with (its 32 hex chars), or None."""
    if not 32 <= len(ident) <= 64:
        return None
    try:
        nid = ident[:32].decode("ascii")
    except UnicodeDecodeError:
        return None
    return nid if NODE_ID_RE.match(nid) else None


class ControlChannel:
    """The control ROUTER, the links to peers and the periodic work of one node.

    Built by :class:`mesh.node.Node`, which it reads for its configuration, info, handlers
    and sockets; every method but :meth:`send` and :meth:`send_now` runs on the node's reactor
    thread.
    """

    def __init__(self, node: Node, membership: Membership, proof_secret: bytes,
                 dial_budget: Budget) -> None:
        self.node = node
        self.config = node.config
        self.membership = membership
        self.dial_budget = dial_budget
        self._proof_secret = proof_secret
        self._counters = node._counters
        self._log = node._log
        self._presence = node.peers.presence
        self._clock = node._clock
        self.msg_limit = node.config.max_message_bytes + _MSG_SLACK
        self.router: zmq.Socket[Any] | None = None
        self.links: dict[str, Link] = {}
        self.dials: dict[int, Link] = {}
        #: configured endpoint -> the node id its last answered dial reached (a proxy or NAT
        #: address the peer does not announce): a later dial to it is known to reach that node
        self._reached: dict[str, str] = {}
        self._dirty: dict[int, Link] = {}
        self._tokens = itertools.count(1 + int.from_bytes(os.urandom(3), "big"))
        self._flush_scheduled = False
        self._gossip_scheduled = False
        #: this tick's bucket hashes for asks: (digest, salt, k, hashes)
        self._ask_cache: tuple[bytes, bytes, int, bytes] | None = None
        self.gossip = gsp.Gossip(_PUSH_EVERY * node.config.presence.heartbeat_s,
                                 _PUSH_PER_TICK)
        #: control revision each peer announced in its HELLO (None: an older build)
        self.revs: dict[str, tuple[int, int] | None] = {}
        #: the ids of the last view gossiped on (to find the ones verified since)
        self._view_ids: set[str] = set()
        #: ids not in our view that some peer gossiped to us since (bounded): a node we
        #: verify later was told about already, so we do not announce it again
        self._heard_of: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._heard_cap = 4 * node.config.max_peers
        self.update_scheduled = False
        self._ticks = 0
        self._heartbeat: Timer | None = None
        # cross-thread send queue (one wake-up per batch, not per message)
        self._out_lock = threading.Lock()
        self._outq: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self._out_scheduled = False
        self._outq_dropped = 0
        # Held by every use of a link's socket (the reactor's flush and closes, and
        # send_now() from another thread): a zmq socket is safe across threads only used by
        # one at a time. Reentrant: the queue's drain flushes under it.
        self._sock_lock = threading.RLock()

    # --- counting ---------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        self._counters[key] += n

    def _bad(self, key: str, message: str, *args: object) -> None:
        # Counted always; logged through the limiter (the first 10 per key, then one per 10 s
        # saying how many were held back), so a flood of garbage cannot flood the log too.
        self._counters[key] += 1
        self._log.warning(key, "node %s: " + message + " (%s #%d)", self.node.name, *args, key,
                          self._counters[key])

    @property
    def outq_dropped(self) -> int:
        with self._out_lock:
            return self._outq_dropped

    # --- lifecycle --------------------------------------------------------------------------

    def setup(self) -> None:
        node = self.node
        router = node.socket(zmq.ROUTER, "control")
        # ROUTER_HANDOVER: a DEALER that reconnects (same socket, same routing id) takes over
        # its half-dead old connection at once. Without it libzmq parks the newcomer as an
        # anonymous pipe whose messages are never read while the old connection lives. Every
        # DEALER has its own random routing id (_new_link), so only the socket that owns a
        # routing id can hand it over: a stranger cannot name one (docs/protocol.md,
        # "Connections and node ids").
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        node.bind(router, "control")
        self.router = router
        node.reactor.add_reader(router, self._on_router)
        self._heartbeat = node.reactor.call_every(self.config.presence.heartbeat_s, self._tick)
        for ep in dict.fromkeys((*self.config.static_peers, *self.config.seeds)):
            self._dial(ep, node_id=None, static=ep)
        self._flush()

    def shutdown(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        bye = control.encode_body(None, self.config.max_message_bytes)
        linger = min(self.config.linger_ms, 250)
        # BYE on every connection a peer may have bound to our id: a dial whose HELLO the
        # peer bound but whose answer we have not read yet is the one it listens to. BYE is
        # the last message: each connection's queue is flushed with it, and nothing is
        # enqueued after it (a HELLO left on a dial and sent after the BYE on another
        # connection revived us at the peer until gone_s).
        for link in (*self.links.values(), *self.dials.values()):
            self._enqueue(link, control.BYE, bye)
        with self._sock_lock:
            self._flush()
            for link in (*self.links.values(), *self.dials.values()):
                link.sock.close(linger=linger)
            self.links.clear()
            self.dials.clear()
        if self.router is not None:
            self.node.reactor.remove_reader(self.router)
            self.router.close(linger=0)

    # --- sending (any thread) ---------------------------------------------------------------

    def send(self, peer_id: str, kind: str, raw: bytes) -> None:
        """Queue an encoded message for ``peer_id`` (:meth:`mesh.node.Node.send`)."""
        if self.node.reactor.in_reactor_thread():
            link = self.links.get(peer_id)
            if link is None:
                raise PeerUnreachable(f"no connection to peer {peer_id}")
            self._enqueue(link, kind, raw)
            self._schedule_flush()
            return
        with self._out_lock:
            if len(self._outq) >= _MAX_OUTQ:
                # Bounded: a producer far ahead of the reactor loses messages (counted), not
                # memory. send() is best effort anyway.
                self._outq_dropped += 1
                return
            self._outq.append((peer_id, kind, raw))
            if self._out_scheduled:
                return
            self._out_scheduled = True
        self.node.reactor.call_soon(self._drain_outq)

    def send_now(self, peer_id: str, messages: list[tuple[str, bytes]]) -> None:
        """Send encoded messages for ``peer_id`` as one multipart from the calling thread,
        without waiting for the reactor's turn (:meth:`mesh.node.Node.send_now`).

        What this thread queued before with :meth:`send` is never overtaken: while anything
        waits in the queue or in the link's batch, the messages are queued behind it. So are
        more than fit one multipart (``SEND_BATCH`` pairs, ``max_message_bytes``): the flush
        cuts them as it cuts any batch.
        """
        size = sum(len(raw) + 4 + control.MAX_KIND_LEN for _, raw in messages)
        if self.node.reactor.in_reactor_thread() or len(messages) > SEND_BATCH or (
                len(messages) > 1 and size > self.config.max_message_bytes):
            for kind, raw in messages:
                self.send(peer_id, kind, raw)
            return
        with self._sock_lock:
            link = self.links.get(peer_id)
            if link is None:
                raise PeerUnreachable(f"no connection to peer {peer_id}")
            if self._outq or link.out or link.sock.closed:
                queued = True
            else:
                queued = False
                self._send_chunk(link, messages)
                link.last_sent = self._clock()
        if queued:
            for kind, raw in messages:
                self.send(peer_id, kind, raw)

    def backlogged(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return link is not None and (link.full or len(link.out) > SEND_BATCH)

    # --- links ------------------------------------------------------------------------------

    def _new_link(self, endpoint: str, node_id: str | None, static: str | None) -> Link:
        node = self.node
        try:
            sock = node.socket(zmq.DEALER, "control-out")
        except ClosedError as exc:
            if node.closed:
                raise
            # libzmq's socket limit or the fd limit: a counted refusal, not a traceback
            self._count("socket_refused")
            raise PeerError(f"no socket for a link to {endpoint}: {exc}") from exc
        # Our node id and random bytes, new for every DEALER: the routing id names the
        # connection, the HELLO it carries binds it to our node id, and nobody else can
        # present it (a stranger's DEALER with our node id is just another connection).
        sock.setsockopt(zmq.ROUTING_ID, node.id.encode("ascii") + os.urandom(_RID_SUFFIX))
        # Nothing legitimate ever arrives on a link (peers answer on their own DEALER to our
        # ROUTER) and the node never reads it: a hostile ROUTER could otherwise queue HWM
        # (10,000) messages of up to MAXMSGSIZE in it. One message, then TCP backpressure.
        sock.setsockopt(zmq.RCVHWM, 1)
        # A gossip dial knows only the id: a certificate names its key.
        security = node.security
        if (security is not None and node_id is not None
                and security.server_key(endpoint) is None):
            security.remember(endpoint, security.key_for_node(node_id))
        try:
            sock.connect(endpoint)
        except AuthenticationFailed as exc:
            sock.close(linger=0)
            raise PeerError(str(exc)) from exc
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise PeerError(f"cannot connect to {endpoint}: {exc}") from exc
        return Link(sock, endpoint, next(self._tokens), node_id, static, self._clock())

    def _dial(self, endpoint: str, node_id: str | None, static: str | None,
              origin: object = None) -> None:
        """Connect a DEALER whose peer has not answered yet, and send it HELLO.

        ``origin`` (who made us dial: a gossiping peer, mDNS) is charged to the dial budget
        until the dial is answered or closed; configured endpoints are not charged.
        """
        if origin is not None and not self.dial_budget.take(origin):
            self._bad("dials_refused", "dial of %s skipped: too many pending dials from %s",
                      endpoint, origin)
            return
        try:
            link = self._new_link(endpoint, node_id, static)
        except PeerError as exc:
            if origin is not None:
                self.dial_budget.give(origin)
            self._bad("dial_errors", "%s", exc)
            return
        link.origin = origin
        self.dials[link.token] = link
        self._send_hello(link)

    def _pop_dial(self, token: int) -> Link | None:
        """Remove a pending dial (answered, adopted or closed) and return its budget."""
        d = self.dials.pop(token, None)
        if d is not None and d.origin is not None:
            self.dial_budget.give(d.origin)
            d.origin = None
        return d

    def _close_link(self, link: Link) -> None:
        self._dirty.pop(id(link), None)
        with self._sock_lock:
            link.sock.close(linger=0)

    def _drop_link(self, link: Link) -> None:
        """Close a link to a gone peer; a configured endpoint is dialled again."""
        self._close_link(link)
        if link.static is not None:
            self._dial(link.static, node_id=None, static=link.static)

    def _send_hello(self, link: Link, reply: bool = False, ack: int | None = None) -> None:
        dial = link.token if link.token in self.dials else None
        # Same for every connection of this node (its data dir's key) to that endpoint, and
        # seen by nobody else: a new connection showing it is us, not a stranger. Keyed by
        # the endpoint alone, so a static dial's first HELLO (the receiver's id not known yet)
        # carries it too, and a receiver cannot replay it to another receiver.
        proof = hmac.new(self._proof_secret, f"hello-proof|{link.endpoint}".encode(),
                         hashlib.sha256).digest()[:16]
        body = control.hello_to_wire(Hello(self.node.info(), dial=dial, ack=ack, reply=reply,
                                           proof=proof))
        self._enqueue(link, control.HELLO, control.encode_body(body, self.config.max_message_bytes))

    def _enqueue(self, link: Link, kind: str, raw: bytes) -> None:
        link.out.append((kind, raw))
        link.last_sent = self._clock()
        self._dirty[id(link)] = link

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.node.reactor.call_soon(self._flush)

    def _flush(self) -> None:
        with self._sock_lock:
            self._flush_scheduled = False
            dirty, self._dirty = self._dirty, {}
            for link in dirty.values():
                out, link.out = link.out, []
                if link.sock.closed:
                    continue
                limit = self.config.max_message_bytes
                i = 0
                while i < len(out):
                    # Up to SEND_BATCH pairs, and at most max_message_bytes in one multipart
                    # (a receiver refuses a bigger message whole: mesh.transport.recv_bounded).
                    j, size = i, 0
                    while j < len(out) and j - i < SEND_BATCH:
                        n = len(out[j][1]) + 4 + control.MAX_KIND_LEN
                        if j > i and size + n > limit:
                            break
                        size += n
                        j += 1
                    chunk, i = out[i:j], j
                    self._send_chunk(link, chunk)

    def _send_chunk(self, link: Link, chunk: list[tuple[str, bytes]]) -> None:
        """One multipart on ``link`` (under ``_sock_lock``); at the HWM it is dropped."""
        try:
            wire = control.encode_frames(chunk)
            link.sock.send_multipart(wire, zmq.NOBLOCK)
            link.full = False
            self._count("control_out", len(chunk))
            self._count("control_bytes_out", sum(map(len, wire)))
        except zmq.Again:
            link.full = True
            self._bad("dropped_hwm", "peer %s at its HWM: dropped %d", link.node_id, len(chunk))
        except zmq.ZMQError as exc:
            self._bad("send_errors", "send to %s failed: %s", link.node_id, exc)

    def _drain_outq(self) -> None:
        # Under _sock_lock from the swap to the flush: a send_now() of the thread that queued
        # these never finds the queue empty while they are not sent yet.
        with self._sock_lock:
            with self._out_lock:
                batch, self._outq = self._outq, collections.deque()
                self._out_scheduled = False
            for peer_id, kind, raw in batch:
                link = self.links.get(peer_id)
                if link is None:
                    self._count("dropped_unreachable")
                    continue
                self._enqueue(link, kind, raw)
            self._flush()

    # --- receiving --------------------------------------------------------------------------

    def _on_router(self, sock: zmq.Socket[Any]) -> None:
        # Frame by frame, bounded per message (MAXMSGSIZE bounds only a frame); zero-copy
        # frames expose the connection's properties (User-Id, Peer-Address).
        sec = self.node.security
        limit = self.msg_limit
        now = self._clock()
        for _ in range(_RECV_BATCH):
            try:
                zframes = recv_bounded(sock, limit, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if zframes is None:
                self._bad("oversize", "control message over %d bytes dropped", limit)
                continue
            key: str | None = None
            if sec is not None:
                try:
                    uid = zframes[0].get("User-Id")
                    key = uid if isinstance(uid, str) else None
                except zmq.ZMQError:
                    key = None
                if key is None or len(zframes) < 3:
                    self._bad("security_no_key", "control message without a CURVE key")
                    continue
                # Per-peer token bucket, one token per control message, charged before
                # decoding so a flood costs almost nothing; keyed by what the handshake proved.
                if not sec.buckets.allow(key, max(1, (len(zframes) - 1) // 2), now):
                    self._bad("security_rate_limited", "peer key %s over its rate limit", key)
                    continue
            self.on_frames([f.bytes for f in zframes], key, zframes[0])
        self._flush()

    def on_frames(self, frames: list[bytes], key: str | None = None,
                  first: zmq.Frame | None = None) -> None:
        """One control multipart from the ROUTER: ``[routing id, header, body, ...]``."""
        self._counters["control_bytes_in"] += sum(map(len, frames))
        if len(frames) < 3:
            self._bad("malformed", "control message of %d frames", len(frames))
            return
        ident = frames[0]
        try:
            messages = control.decode_frames(frames[1:])
        except ProtocolError as exc:
            self._bad("malformed", "%s", exc)
            return
        peer_id = rid_node(ident)
        now = self._clock()
        ms = self.membership
        # Only the connection a node id is bound to (by the HELLO it carried) speaks for it.
        bound = ms.is_bound(peer_id, ident)
        if bound and key is not None:
            assert peer_id is not None
            row = self._presence.get(peer_id)
            if row is None or row.info.public_key != key:
                self._bad("security_key_mismatch", "message for %s under another key %r",
                          peer_id, key)
                return
        if bound and messages[0].kind != control.HELLO:
            assert peer_id is not None
            self._heard(peer_id, now)
        n_in = 0
        for m in messages:
            if m.error is not None:
                err = "unsupported_version" if isinstance(
                    m.error, UnsupportedProtocol
                ) else "malformed"
                self._bad(err, "from %r: %s", ident[:40], m.error)
                continue
            if m.kind == control.HELLO:
                self._on_hello(ident, peer_id, key, first, m.body, now)
                bound = ms.is_bound(peer_id, ident)
                continue
            if not bound or peer_id is None:
                sup = ms.superseded_message(peer_id, ident, m.kind, now)
                if isinstance(sup, PeerInfo):
                    # Two processes hold this id and this connection appeared first: it is
                    # bound again, with the info it last announced (membership counted it).
                    assert peer_id is not None
                    self._admit(sup, Hello(sup, reply=True), now)
                    bound = True
                elif (sup or ms.refused_message(peer_id, ident)
                      or ms.claimant_message(peer_id, ident, m.kind, m.body)):
                    continue
                if not bound and m.kind == control.BYE:
                    # a leaving node says BYE on every connection, bound or not: harmless
                    self._count("bye_unbound")
                    continue
                if not bound:
                    self._bad("unknown_sender", "%s from %r, which sent no valid HELLO on "
                              "this connection", m.kind, ident[:40])
                    continue
            assert peer_id is not None
            n_in += 1
            self._dispatch(peer_id, m.kind, m.body, now)
        self._counters["control_in"] += n_in  # once per multipart, not per message

    def _heard(self, peer_id: str, now: float) -> None:
        with self.node.peers.lock:
            events = self._presence.heard(peer_id, now)
        if events:
            # It was gone (we closed our DEALER) or evasive: make sure we can reach it again.
            row = self._presence.get(peer_id)
            if row is not None and peer_id not in self.links:
                self._connect_known(row.info)
            self.node._emit(events)

    def _take_dial(self, info: PeerInfo) -> Link | None:
        """Pop a pending dial that reaches ``info``'s node (by id or by announced endpoint)."""
        peer_eps = set(info.endpoints.get("control", ()))
        for token, d in list(self.dials.items()):
            if d.node_id == info.node_id or (d.node_id is None and (
                d.endpoint in peer_eps or self._reached.get(d.endpoint) == info.node_id
            )):
                self._pop_dial(token)
                d.node_id = info.node_id
                return d
        return None

    def _connect_known(self, info: PeerInfo) -> None:
        dial = self._take_dial(info)
        if dial is not None:
            self.links[info.node_id] = dial
            self._send_hello(dial)
            return
        self._connect_new(info, None)

    def _dispatch(self, peer_id: str, kind: str, body: Any, now: float) -> None:
        node = self.node
        if kind == control.PING:
            link = self.links.get(peer_id)
            if link is not None:
                echo = body if isinstance(body, int) and not isinstance(body, bool) else None
                self._enqueue(link, control.PONG, control.encode_body(echo, 64))
        elif kind == control.PONG:
            # Liveness was recorded already. A PONG echoing our link's token proves the node
            # at the endpoint we dialled answers through this bound connection: verified.
            link = self.links.get(peer_id)
            if link is not None and not link.verified and body == link.token:
                link.verified = True
                self.schedule_gossip()
        elif kind == control.UPDATE:
            try:
                hello = control.hello_from_wire(body)
            except ProtocolError as exc:
                self._bad("malformed", "UPDATE from %s: %s", peer_id, exc)
                return
            if hello.info.node_id != peer_id or hello.info.mesh != node.mesh:
                self._bad("malformed", "UPDATE from %s describes another node or mesh", peer_id)
                return
            if hello.info.incarnation != self.membership.incs.get(peer_id, 0):
                # one connection is one process: its incarnation never changes
                self._bad("malformed", "UPDATE from %s announces another incarnation than "
                          "its connection's HELLO", peer_id)
                return
            row = self._presence.get(peer_id)
            if (node.security is not None and row is not None
                    and hello.info.public_key != row.info.public_key):
                self._bad("security_key_mismatch", "UPDATE from %s announces another key",
                          peer_id)
                return
            with node.peers.lock:
                events = self._presence.upsert(hello.info, now, "update")
            node._emit(events)
        elif kind == control.GOSSIP:
            self._on_gossip(peer_id, body)
        elif kind == control.DIGEST:
            self._on_digest(peer_id, body, now)
        elif kind == control.BYE:
            # BYE is the last message of that connection: unbind it, so nothing still in
            # flight on it counts as hearing from the node (only a new HELLO brings it back).
            self.membership.unbind(peer_id)
            with node.peers.lock:
                events = self._presence.goodbye(peer_id, now)
            link = self.links.pop(peer_id, None)
            if link is not None:
                self._drop_link(link)
            self.gossip.forget(peer_id)
            self._view_ids.discard(peer_id)
            node._emit(events)
        else:
            handler = node._handlers.get(kind)
            if handler is None:
                self._bad("unhandled_kind", "no handler for %r from %s", kind, peer_id)
                return
            try:
                handler(peer_id, body)
            except Exception:
                self._count("handler_errors")
                self._log.log(logging.ERROR, f"handler:{kind}",
                              "node %s: handler for %r from %s raised", node.name, kind, peer_id,
                              exc_info=True)

    # --- what happens when a HELLO arrives ----------------------------------------------------

    def _on_hello(self, ident: bytes, peer_id: str | None, key: str | None,
                  first: zmq.Frame | None, body: Any, now: float) -> None:
        try:
            hello = control.hello_from_wire(body)
        except UnsupportedProtocol as exc:
            self._bad("unsupported_version", "HELLO: %s", exc)
            return
        except ProtocolError as exc:
            self._bad("malformed", "HELLO: %s", exc)
            return
        ms = self.membership
        verdict = ms.check_hello(ident, peer_id, key, hello)
        if verdict is None:
            return
        if verdict == "self":
            # We dialled ourselves (our own endpoint in static_peers): forget that dial.
            if hello.dial is not None and (d := self._pop_dial(hello.dial)) is not None:
                self._close_link(d)
            return
        info = hello.info
        if not ms.is_bound(info.node_id, ident):
            link = self.links.get(info.node_id)
            decision = ms.claim(ident, info.node_id, key, _peer_address(first), hello, body, now,
                                has_link=link is not None)
            if decision is Claim.HELD_ANSWER:
                assert link is not None
                self._send_hello(link, reply=True, ack=hello.dial)
            if decision not in (Claim.BOUND, Claim.REBOUND, Claim.REVERTED):
                return
        elif not ms.same_connection(info.node_id, hello):
            return
        self._count("control_in")
        self.revs[info.node_id] = hello.rev
        self._admit(info, hello, now)

    def _admit(self, info: PeerInfo, hello: Hello, now: float) -> None:
        """A HELLO on the connection bound to its node: upsert the peer, settle our link to
        it (adopting the dial it answers), and answer it."""
        prev = self._presence.get(info.node_id)
        was_live = prev is not None and prev.state is not PeerState.GONE
        with self.node.peers.lock:
            events = self._presence.upsert(info, now, "hello")
        link = self.links.get(info.node_id)
        # Adopt the dial this HELLO answers, or a dial made for this node id (gossip / mDNS).
        adopt = self._pop_dial(hello.ack) if hello.ack is not None else None
        acked = adopt is not None
        if adopt is not None:
            adopt.verified = True  # the node read our dial's HELLO and answered as itself
            if adopt.static is not None:
                self._reached[adopt.static] = info.node_id
        for token, d in list(self.dials.items()):
            if d.node_id == info.node_id:
                self._pop_dial(token)
                if adopt is None:
                    adopt = d
                else:
                    self._close_link(d)
        if adopt is None and link is None:
            # A configured endpoint we dialled without knowing who answers: if the peer
            # announces it, that dial is our link to it (no second DEALER to the same peer).
            adopt = self._take_dial(info)
        if adopt is not None:
            # An acked dial is the connection the peer just read from: keep it over an older
            # link (whose connection the peer's ROUTER may have handed over to this one).
            if link is None or not was_live or acked:
                if link is not None:
                    adopt.static = adopt.static or link.static
                    self._close_link(link)
                adopt.node_id = info.node_id
                self.links[info.node_id] = link = adopt
            else:
                link.static = link.static or adopt.static
                self._close_link(adopt)
        elif link is not None and (
            not was_live or link.endpoint not in info.endpoints.get("control", ())
        ):
            # The peer came back (restart, maybe new endpoints): fresh DEALER.
            static = link.static
            self._close_link(link)
            del self.links[info.node_id]
            link = None
            self._connect_new(info, static)
            link = self.links.get(info.node_id)
            if link is not None and not hello.reply:
                link.out.clear()  # _connect_new sent a HELLO; the reply below replaces it
        if link is None:
            self._connect_new(info, None)
            link = self.links.get(info.node_id)
            if link is not None and not hello.reply:
                link.out.clear()
        if link is not None and not hello.reply:
            self._send_hello(link, reply=True, ack=hello.dial)
        self.node._emit(events)

    def _static_for(self, node_id: str) -> str | None:
        """The configured endpoint last seen reaching ``node_id``, if any.

        A link to that node carries it, so losing the link redials the configured endpoint
        (a link opened without it left nothing to redial: the node stayed alone for good).
        """
        for ep, nid in self._reached.items():
            if nid == node_id:
                return ep
        return None

    def _connect_new(self, info: PeerInfo, static: str | None) -> None:
        static = static or self._static_for(info.node_id)
        ep = self.node.connect_endpoint(info, "control")
        if ep is None:
            self._bad("no_endpoint", "peer %s announces no usable control endpoint", info.node_id)
            return
        try:
            link = self._new_link(ep, info.node_id, static)
        except PeerError as exc:
            self._bad("dial_errors", "%s", exc)
            return
        self.links[info.node_id] = link
        self._send_hello(link)

    def _on_gossip(self, sender: str, body: Any) -> None:
        try:
            entries, bad = control.gossip_from_wire(body)
        except ProtocolError as exc:
            self._bad("malformed", "GOSSIP: %s", exc)
            return
        if bad:
            self._count("malformed", bad)
        self._count("gossip_in")
        node = self.node
        heard = self._heard_of
        for entry in entries:
            if entry[0] not in self._view_ids and entry[0] != node.id:
                heard[entry[0]] = None
                heard.move_to_end(entry[0])
        while len(heard) > self._heard_cap:
            heard.popitem(last=False)
        dialling = {d.node_id or self._reached.get(d.endpoint) for d in self.dials.values()}
        dial_eps = {d.endpoint for d in self.dials.values()}
        for node_id, _mesh, host, eps, key in self.membership.gossip_candidates(
                entries, dialling, dial_eps, self.links):
            ep = choose_endpoint({"control": eps}, "control", host == node.host,
                                 self.config.transports)
            if ep is None:
                self._bad("no_endpoint", "gossip from %s names %s without a usable control "
                          "endpoint", sender, node_id)
                continue
            if node.security is not None:
                # CURVE needs the server key to dial. Only a key our own trust store admits
                # is used: a gossiper cannot point us at a server of its choosing.
                if key is None or not node.security.store.allowed(key):
                    node.security.count("gossip_untrusted_key")
                    continue
                node.security.remember(ep, key)
            self._count("gossip_dials")
            self._dial(ep, node_id=node_id, static=None, origin=("gossip", sender))
            dialling.add(node_id)

    # --- discovery (mDNS) -------------------------------------------------------------------

    def on_discovered(self, info: PeerInfo, source: str) -> None:
        node = self.node
        if node.closed or info.mesh != node.mesh or info.node_id == node.id:
            return  # closing: discovery may still report peers, but nothing is dialled
        if info.node_id in self.links or self._presence.is_live(info.node_id):
            return  # the control channel is authoritative for live peers
        if any(d.node_id == info.node_id for d in self.dials.values()):
            return
        ep = node.connect_endpoint(info, "control")
        if ep is not None:
            self._count(f"{source}_dials")
            self._dial(ep, node_id=info.node_id, static=None, origin=(source, None))
            self._flush()

    def on_discovery_goodbye(self, node_id: str) -> None:
        # An mDNS goodbye is unauthenticated multicast: anyone on the LAN can send one for
        # any instance name. It takes nobody away; only the peer's own control channel does
        # (BYE, or silence past gone_s). Counted only.
        self._count("discovery_goodbyes_ignored")

    # --- periodic work ----------------------------------------------------------------------

    def _tick(self) -> None:
        # Read what is already waiting first: when this thread was busy (a big send batch, a
        # slow handler) the peers' messages are queued here, not missing, and must not make
        # them look quiet.
        if self.router is not None:
            self._on_router(self.router)
        now = self._clock()
        hb = self.config.presence.heartbeat_s
        ms = self.membership
        if ms.superseded or ms.conflicts:
            ms.expire(now)
        if ms.claims:
            for peer_id, c in ms.retry_claims(now):
                self._on_hello(c.ident, peer_id, c.key, None, c.body, now)
                if c.update is not None and ms.is_bound(peer_id, c.ident):
                    self._dispatch(peer_id, control.UPDATE, c.update, now)
        with self.node.peers.lock:
            tick = self._presence.tick(now)
        for node_id in tick.pruned:
            ms.forget(node_id)
            self.revs.pop(node_id, None)
        for node_id in tick.gone:
            self.gossip.forget(node_id)
            self._view_ids.discard(node_id)  # back later: a newcomer again
            link = self.links.pop(node_id, None)
            if link is not None:
                self._drop_link(link)
        pinged = set(tick.ping)
        for node_id in tick.ping:
            link = self.links.get(node_id)
            if link is not None:
                # An evasive peer gets HELLO, not PING: if it restarted with the same id (and
                # our DEALER silently reconnected to the new process), it never heard our
                # HELLO and drops PINGs as from an unknown sender; a HELLO re-introduces us
                # and its reply brings its new info back. A live peer just answers it.
                self._send_hello(link)
        for node_id, link in self.links.items():
            # Keepalive: a peer that hears from us every heartbeat never turns evasive. The
            # PING carries the link's token; its echo verifies the link (gossip names only
            # verified peers), so an unverified link is pinged every heartbeat.
            if node_id not in pinged and (now - link.last_sent >= hb * 0.9 or not link.verified):
                self._enqueue(link, control.PING, control.encode_body(link.token, 64))
        for token, d in list(self.dials.items()):
            if now - d.created > self.config.presence.gone_s:
                self._pop_dial(token)
                self._close_link(d)
                if d.static is not None:
                    # Unanswered for gone_s: its connection may be stranded (a ROUTER that
                    # handed our routing id to another of our DEALERs never reads nor closes
                    # the older connection, so it never reconnects). A fresh DEALER and token
                    # take the routing id back; resending HELLO on the old one never would.
                    self._count("static_redials")
                    self._dial(d.static, node_id=None, static=d.static)
            elif now - d.last_sent >= hb * 0.9:
                self._send_hello(d)  # the peer may have come up since (or lost our HELLO)
        self._ticks += 1
        self._ask_cache = None  # a new salt for this tick's asks
        if self._ticks % _GOSSIP_EVERY == 0:
            self._gossip_round(now)
        if self.gossip.owed():
            view = self._view()
            for peer_id, what in self.gossip.due(now, gsp.digest([*view, self.node.id])):
                self._push(peer_id, what, view)
        else:
            self.gossip.due(now)  # a new tick: a new budget
        self.node._emit(tick.events)
        self._flush()

    def _view(self) -> dict[str, control.GossipEntry]:
        """What this node gossips: the peers it verified itself, not GONE (a HELLO flood of
        fake node ids is never passed on to the rest of the mesh), by node id."""
        out: dict[str, control.GossipEntry] = {}
        for r in self._presence.records():
            i = r.info
            if r.state is not PeerState.GONE and (
                    lk := self.links.get(i.node_id)) is not None and lk.verified:
                out[i.node_id] = (i.node_id, i.mesh, i.host, i.endpoints.get("control", ()),
                                  i.public_key)
        return out

    def _digest(self, view: dict[str, control.GossipEntry], pull: bool = False,
                salt: bytes | None = None, buckets: bytes | None = None, k: int = 0,
                want: tuple[int, ...] | None = None) -> bytes:
        ids = [*view, self.node.id]
        body = control.digest_to_wire(control.Digest(gsp.digest(ids), len(ids), pull, salt,
                                                     buckets, k, want))
        return control.encode_body(body, 16 << 10)

    def _send_gossip(self, link: Link, entries: list[control.GossipEntry], what: str) -> bool:
        if not entries:
            return False
        try:
            raw = control.encode_body(control.gossip_to_wire(entries),
                                      self.config.max_message_bytes)
        except ProtocolError as exc:  # FrameTooLarge: more peers than one message holds
            self._bad("send_errors", "gossip to %s not sent: %s", link.node_id, exc)
            return False
        self._enqueue(link, control.GOSSIP, raw)
        self._count("gossip_sent")
        self._count(what)
        self._count("gossip_list_bytes_sent", len(raw))
        return True

    def _push(self, peer_id: str, what: gsp.Owed, view: dict[str, control.GossipEntry]) -> None:
        """A list to ``peer_id`` (the rate limit was asked): the full list (and a pull), or a
        bucket answer (control 1.3): to the peer's bucket hashes, our entries of the buckets
        that differ and a want of them; to a want, our entries of the wanted buckets."""
        if what.ask:
            self._ask(peer_id, view)
        if what.full:
            self._push_full(peer_id, what.pull, view)
            return
        link = self.links.get(peer_id)
        if link is None or not self._presence.is_live(peer_id):
            return
        if (c := what.compare) is not None:
            ids = [*view, self.node.id]
            parts = gsp.assign(ids, c.salt, c.k)
            diff = gsp.differing(gsp.hashes(parts, c.salt), c.theirs)
            if diff:
                self._bucket_list(link, view, [nid for i in diff for nid in parts[i]])
                self._enqueue(link, control.DIGEST, self._digest(
                    view, True, c.salt, k=c.k, want=tuple(diff)))
                self._count("gossip_wants_sent")
            elif c.d is not None and c.d != gsp.digest(ids):
                # equal buckets, differing digests: a collision under this salt
                self._count("gossip_bucket_fallbacks")
                self._push_full(peer_id, True, view)
                return
            # else the views agree now
        if (w := what.want) is not None:
            self._bucket_list(link, view, gsp.in_buckets(view, w.salt, w.k, w.buckets))

    def _bucket_list(self, link: Link, view: dict[str, control.GossipEntry],
                     ids: Iterable[str]) -> None:
        """Our entries of ``ids`` (those of some buckets) to the peer of ``link``."""
        entries = [view[nid] for nid in ids if nid in view and nid != link.node_id]
        if self._send_gossip(link, entries, "gossip_bucket_lists_sent"):
            self._count("gossip_bucket_entries_sent", len(entries))

    def _ask(self, peer_id: str, view: dict[str, control.GossipEntry]) -> None:
        """Our bucket hashes to a 1.3 peer whose digest differs (instead of a full list)."""
        link = self.links.get(peer_id)
        if link is None or not self._presence.is_live(peer_id):
            return
        ids = [*view, self.node.id]
        k = gsp.bucket_count(len(ids))
        # One salt per tick for all our asks: the hashes of one view are computed once
        # (every peer that differs in a tick gets the same); the next tick has a new salt.
        d = gsp.digest(ids)
        cache = self._ask_cache
        if cache is None or cache[0] != d or cache[2] != k:
            salt = os.urandom(gsp.SALT_BYTES)
            cache = self._ask_cache = (d, salt, k, gsp.buckets(ids, salt, k))
        self._enqueue(link, control.DIGEST, self._digest(view, True, cache[1], cache[3]))
        self._count("gossip_buckets_sent")

    def _push_full(self, peer_id: str, pull: bool, view: dict[str, control.GossipEntry]) -> None:
        """Our full list to ``peer_id`` (the rate limit was asked), and a pull request."""
        link = self.links.get(peer_id)
        if link is None or not self._presence.is_live(peer_id):
            return
        self._send_gossip(link, [e for nid, e in view.items() if nid != peer_id],
                          "gossip_full_sent")
        if pull:
            self._enqueue(link, control.DIGEST, self._digest(view, pull=True))
            self._count("gossip_pulls_sent")

    def schedule_gossip(self) -> None:
        if not self._gossip_scheduled:
            self._gossip_scheduled = True
            try:
                self.node.reactor.call_soon(self._gossip_changes)
            except ClosedError:
                pass  # the node is closing (a message read in the reactor's last pass)

    def _gossip_changes(self) -> None:
        """A peer joined or a link was verified: tell the others about the ids verified since
        the last look. A node that came to us on its own (nobody gossiped it to us: we are its
        seed, static peer or mDNS contact) gets our full list and every other peer its entry
        (a delta); one we were told about already was announced by whoever told us. A peer
        too old to read ``digest`` gets the full list, as before this revision."""
        self._gossip_scheduled = False
        view = self._view()
        new = [nid for nid in view if nid not in self._view_ids]
        self._view_ids = set(view)
        if not new:
            return
        fresh = []
        for nid in new:
            told = nid in self._heard_of
            self._heard_of.pop(nid, None)
            if not told:
                fresh.append(nid)
        now = self._clock()
        for node_id, link in self.links.items():
            if not self._presence.is_live(node_id):
                continue
            if not gsp.speaks_digest(self.revs.get(node_id)):
                self._send_gossip(link, [e for nid, e in view.items() if nid != node_id],
                                  "gossip_full_sent")
            elif node_id in fresh:
                if self.gossip.request_push(node_id, now, newcomer=True):
                    self._push_full(node_id, False, view)
                    self._count("gossip_newcomer_sent")
                else:
                    self._count("gossip_push_limited")
            else:
                self._send_gossip(link, [view[nid] for nid in fresh if nid != node_id],
                                  "gossip_deltas_sent")
        self._flush()

    def _gossip_round(self, now: float) -> None:
        """Every _GOSSIP_EVERY heartbeats: a digest to each live peer that reads one, the full
        list to one that does not."""
        view = self._view()
        raw = self._digest(view)
        for node_id, link in self.links.items():
            if not self._presence.is_live(node_id):
                continue
            if gsp.speaks_digest(self.revs.get(node_id)):
                self._enqueue(link, control.DIGEST, raw)
                self._count("gossip_digests_sent")
            else:
                self._send_gossip(link, [e for nid, e in view.items() if nid != node_id],
                                  "gossip_full_sent")
        self._flush()

    def _on_digest(self, sender: str, body: Any, now: float) -> None:
        try:
            d = control.digest_from_wire(body)
        except ProtocolError as exc:
            self._bad("malformed", "DIGEST from %s: %s", sender, exc)
            return
        self._count("gossip_digests_in")
        if d.salt is not None:
            # A bucket step (1.3): the sender's bucket hashes (answered with our entries of
            # the buckets that differ and a want of them) or its want (answered with our
            # entries of those buckets, nothing more: two nodes never loop). Rate-limited.
            if d.buckets is not None:
                self._count("gossip_buckets_in")
                what = gsp.Owed(compare=gsp.Compare(d.salt, d.buckets, d.digest))
            else:
                self._count("gossip_wants_in")
                what = gsp.Owed(want=gsp.Want(d.salt, d.k, frozenset(d.want or ())))
            if self.gossip.request_push(sender, now, theirs=d.digest, what=what):
                self._push(sender, what, self._view())
            else:
                self._count("gossip_push_limited")
            return
        if d.pull:
            # The sender saw our digest differ and asks for our list: answered (rate-limited),
            # compared with nothing, never answered with a pull (two nodes never loop).
            self._count("gossip_pulls_in")
            if self.gossip.request_push(sender, now, theirs=d.digest):
                self._push_full(sender, False, self._view())
            else:
                self._count("gossip_push_limited")
            return
        view = self._view()
        mine = gsp.digest([*view, self.node.id])
        if d.digest == mine:
            self.gossip.on_agree(sender, d.digest)
            return
        self._count("gossip_mismatches")
        if not self.gossip.on_mismatch(sender, mine, d.digest):
            self._count("gossip_backoff")
            return
        if gsp.speaks_buckets(self.revs.get(sender)):
            # our bucket hashes, not our full list: the answer carries only what differs
            verdict = self.gossip.may_ask(sender, now)
            if verdict == "send":
                self._ask(sender, view)
            elif verdict == "owed":
                self._count("gossip_push_limited")
            else:
                self._count("gossip_asks_limited")
            return
        if self.gossip.request_push(sender, now, pull=True):
            self._push_full(sender, True, view)
        else:
            self._count("gossip_push_limited")

    def announce_update(self) -> None:
        self.update_scheduled = False  # before reading info(): a later change sends again
        if not self.links and not self.dials:
            return
        body = control.hello_to_wire(Hello(self.node.info()))
        raw = control.encode_body(body, self.config.max_message_bytes)
        # Every link and pending dial, live or not: a HELLO that left before this change
        # carried the old info, and the UPDATE follows it on the same connection (a peer that
        # was not live yet would otherwise keep the old offers for good).
        for dial in (*self.links.values(), *self.dials.values()):
            self._enqueue(dial, control.UPDATE, raw)
        self._flush()


def _peer_address(first: zmq.Frame | None) -> str | None:
    """The source address of the connection a frame came on, if libzmq knows it."""
    if first is None:
        return None
    try:
        return str(first.get("Peer-Address"))
    except (zmq.ZMQError, ValueError, TypeError):
        return None
