"""The node: a small facade over the parts of a mesh node.

A :class:`Node` owns one ZeroMQ context, one data directory (where its stable id lives), and
one :class:`~mesh.reactor.Reactor` thread that owns every socket the node uses. Public methods
are safe from any thread; they hand work to the reactor (batched, see ``send``). Patterns create
their sockets with :meth:`Node.socket` (the one place limits, CURVE and metrics are applied)
and may register them with ``node.reactor``.

The parts (docs/architecture.md, "Node core"):

- mesh.datadir: the data dir's lock, node id and proof key;
- mesh.sockets: the socket factory (options, binds, CURVE, the sockets closed at the end);
- mesh.membership: which connection speaks for which node id (HELLO claims, budgets, gossip
  filtering): decisions only, no sockets;
- mesh.channel: the control channel's I/O (docs/protocol.md): links, HELLO / UPDATE / PING /
  PONG / GOSSIP / BYE, flushing, presence ticks; other kinds go to the handlers registered
  with :meth:`Node.handle`.

This module composes them: lifecycle, offers, peer events, ``send`` / ``handle`` /
``permits``, stats and metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import socket as _socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import zmq

from mesh import control, gossip
from mesh.budget import Budget, LogLimiter
from mesh.channel import ControlChannel
from mesh.datadir import load_node_id, load_proof_key, lock_data_dir, next_incarnation
from mesh.errors import (
    ClosedError,
    ConfigError,
    MeshTimeout,
    PeerUnreachable,
    ProtocolError,
)
from mesh.lifecycle import Closers
from mesh.membership import Membership
from mesh.metrics import Collect, Registry
from mesh.observe import STATS_KIND, StatsResponder
from mesh.peers import (
    OFFER_KINDS,
    PROTOCOL_VERSION,
    PeerEvent,
    PeerEventKind,
    PeerInfo,
    PeerState,
    PeerTable,
    Presence,
)
from mesh.ports import PortBook, env_data_ports, parse_port_range
from mesh.reactor import Reactor
from mesh.sockets import SocketFactory
from mesh.transport import (
    host_id,
    ipc_dir,
    plaintext_warning,
    remove_stale_ipc,
    resolve_interface,
)

if TYPE_CHECKING:
    from mesh.security import NodeSecurity, SecurityConfig

__all__ = ["Node", "NodeConfig", "PresenceConfig", "load_node_id", "load_proof_key",
           "lock_data_dir"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PresenceConfig:
    """Presence timing (defaults in the spirit of ZRE).

    Attributes:
        heartbeat_s: interval of presence ticks and keepalive PINGs.
        evasive_s: quiet time after which a peer is evasive (and pinged every heartbeat).
        gone_s: quiet time after which a peer is gone (LEFT event).
        prune_s: how long a gone peer stays listed before it is forgotten.
    """

    heartbeat_s: float = 1.0
    evasive_s: float = 3.0
    gone_s: float = 10.0
    prune_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.evasive_s < self.gone_s:
            raise ConfigError(
                "presence needs 0 < heartbeat_s < evasive_s < gone_s, got "
                f"{self.heartbeat_s}, {self.evasive_s}, {self.gone_s}"
            )
        if self.prune_s < 0:
            raise ConfigError(f"prune_s must be >= 0, got {self.prune_s}")


def _check_endpoint(ep: object) -> None:
    if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"peer endpoint must be a tcp:// or ipc:// string, got {ep!r}")


@dataclass(frozen=True)
class NodeConfig:
    """Configuration of one node.

    Attributes:
        data_dir: the node's directory (its id lives in ``node.id``).
        name: human-readable name; default ``<hostname>-<pid>``.
        mesh: mesh name; nodes of other meshes are ignored.
        interface: IPv4 address, interface name, or ``*`` to bind tcp on; None reads the
            ``ZEROMESH_INTERFACE`` environment variable, else ``*`` (all interfaces, announced
            with their concrete addresses).
        transports: ``"tcp"`` and/or ``"ipc"``.
        port: the tcp port of the control endpoint (what ``static_peers`` of other nodes and
            firewall rules name); None (the default) reads ``ZEROMESH_PORT``, else an
            OS-chosen port that changes at every start.
        data_ports: ``(lo, hi)``, inclusive: every other tcp bind (pub/sub, queues, services)
            takes a port in this range (what a firewall rule opens); None (the default) reads
            ``ZEROMESH_DATA_PORTS`` (``LO-HI``), else any port. Data ports move at every start
            (mesh.ports says why); peers learn them from HELLO over the control channel, so a
            static peer needs only the control endpoint.
        static_peers: control endpoints of peers to dial (and redial) always.
        seeds: control endpoints to dial at start; the rest of the mesh is learnt by gossip.
        mdns: start mDNS discovery (``mesh.discovery``) when it is available.
        presence: heartbeat / evasive / gone timing.
        linger_ms: LINGER of every socket (how long close waits to deliver queued messages).
        max_message_bytes: MAXMSGSIZE of every socket, and the largest control body sent.
        hwm: send and receive high-water marks of every socket.
        security: CURVE + ZAP + permissions on every socket (mesh.security); None (the
            default) means plaintext.
        max_peers: node ids that HELLOs may put in the peer table (and give a link), all
            sources together; a HELLO past it is refused and counted (``peer_ids_refused``).
        max_ids_per_source: node ids one source address may introduce (plaintext).
        max_ids_per_key: node ids one CURVE key may introduce (security on).
        max_dials: pending dials (gossip and mDNS) at once; past it a dial is skipped and
            counted (``dials_refused``); one gossiping peer gets at most a quarter of it.
    """

    data_dir: str | Path
    name: str | None = None
    mesh: str = "default"
    interface: str | None = None
    transports: tuple[str, ...] = ("tcp", "ipc")
    port: int | None = None
    data_ports: tuple[int, int] | None = None
    static_peers: tuple[str, ...] = ()
    seeds: tuple[str, ...] = ()
    mdns: bool = True
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    linger_ms: int = 1000
    max_message_bytes: int = 4 << 20
    hwm: int = 10000
    security: SecurityConfig | None = None
    max_peers: int = 512
    max_ids_per_source: int = 64
    max_ids_per_key: int = 4
    max_dials: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.mesh, str) or not 0 < len(self.mesh) <= 64:
            raise ConfigError(f"mesh name must be 1-64 characters, got {self.mesh!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigError(f"node name must be a non-empty string, got {self.name!r}")
        if not self.transports or not set(self.transports) <= {"tcp", "ipc"}:
            raise ConfigError(f"transports must be a non-empty subset of tcp, ipc: {self.transports}")
        for ep in (*self.static_peers, *self.seeds):
            _check_endpoint(ep)
        if self.port is not None and (type(self.port) is not int or not 0 < self.port < 65536):
            raise ConfigError(f"port must be 1-65535 (or None for any), got {self.port!r}")
        if self.data_ports is not None:
            object.__setattr__(self, "data_ports", parse_port_range(self.data_ports))
        for key in ("linger_ms", "max_message_bytes", "hwm", "max_peers", "max_ids_per_source",
                    "max_ids_per_key", "max_dials"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0 or (key != "linger_ms" and value == 0):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _env_port() -> int | None:
    """``$ZEROMESH_PORT`` (the control port), or None.

    Raises:
        ConfigError: it is set but not a port number.
    """
    text = os.environ.get("ZEROMESH_PORT")
    if not text:
        return None
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ConfigError(f"ZEROMESH_PORT must be a port number 1-65535, got {text!r}")
    return port


_CLOSED = object()


class Node:
    """A mesh node. Use as a context manager, or call :meth:`close`.

    ``Node(config)`` or ``Node(data_dir=..., name=..., **other NodeConfig fields)``.

    Raises:
        ConfigError: invalid configuration, unreadable id file, or nothing could be bound.
    """

    def __init__(self, config: NodeConfig | None = None, /, **kwargs: Any) -> None:
        if config is None:
            config = NodeConfig(**kwargs)
        elif kwargs:
            raise ConfigError("pass either a NodeConfig or keyword arguments, not both")
        self.config = config
        self.data_dir = Path(config.data_dir)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {self.data_dir}: {exc}") from exc
        self.id = load_node_id(self.data_dir)
        self.name = config.name or f"{_socket.gethostname()}-{os.getpid()}"
        self.mesh = config.mesh
        self.host = host_id()
        bind_host = resolve_interface(
            config.interface or os.environ.get("ZEROMESH_INTERFACE") or "*"
        )
        self._bind_host = bind_host
        #: grows with every start on this data dir (mesh.datadir.next_incarnation); set under
        #: node.lock before the first HELLO, announced in HELLO, UPDATE and mDNS
        self.incarnation = 0
        control_port = config.port if config.port is not None else _env_port()
        self._closers = Closers()  # live patterns, closed first by close() (mesh.lifecycle)
        p = config.presence
        self._clock = time.monotonic
        self.peers = PeerTable(
            Presence(p.evasive_s, p.gone_s, p.prune_s),
            on_upsert=self._discovered,
            on_goodbye=self._discovery_goodbye,
            clock=self._clock,
        )
        self._presence = self.peers.presence
        self.context: zmq.Context[Any] = zmq.Context()
        self.reactor = Reactor(self.context, name=f"zeromesh-{self.name}")
        self._closed = False
        self._close_lock = threading.Lock()
        # stable ports (mesh.ports): each role's tcp port is recorded in the data dir
        self._factory = SocketFactory(
            self.context, self.reactor, name=self.name, node_id=self.id, host=self.host,
            bind_host=bind_host, transports=config.transports,
            ports=PortBook(self.data_dir, config.data_ports or env_data_ports(), control_port),
            linger_ms=config.linger_ms, max_message_bytes=config.max_message_bytes,
            hwm=config.hwm,
        )
        self._info_lock = threading.Lock()
        self._endpoints: dict[str, tuple[str, ...]] = {}
        self._offers: dict[str, set[str]] = {k: set() for k in OFFER_KINDS}
        self._info: PeerInfo | None = None
        self._handlers: dict[str, Callable[[str, Any], None]] = {}
        self._subscribers: tuple[Callable[[PeerEvent], None], ...] = ()
        self._iter_closers: set[Callable[[], None]] = set()
        self._counters: collections.Counter[str] = collections.Counter()
        #: every log line a remote peer can trigger goes through here
        self._log = LogLimiter(log)
        self._peer_budget = Budget(
            "peer_ids",
            config.max_ids_per_key if config.security is not None else config.max_ids_per_source,
            config.max_peers)
        self._dial_budget = Budget("dials", max(1, config.max_dials // 4), config.max_dials)
        # The ZAP handler must listen before the first CURVE server binds (libzmq lets every
        # client in when no handler is there).
        self.security: NodeSecurity | None = None
        self._key_ids: dict[str, str] = {}  # CURVE key -> node id cache (peer_by_key)
        # Connections and node ids (docs/protocol.md, "Connections and node ids"): decided
        # in mesh.membership, carried out by the control channel (mesh.channel).
        self._membership = Membership(
            self.id, self.mesh, self._presence, heartbeat_s=p.heartbeat_s,
            evasive_s=p.evasive_s, gone_s=p.gone_s, peer_budget=self._peer_budget,
            secure=config.security is not None, key_for_node=self._key_for_node,
            counters=self._counters, log=self._log, lock=self.peers.lock, name=self.name,
        )
        # The proof key is kept in the data dir, so a restart of this node proves it is the
        # one that spoke on the old connection and rebinds its id at once (in plaintext
        # nothing else can).
        self._channel = ControlChannel(self, self._membership, load_proof_key(self.data_dir),
                                       self._dial_budget)
        #: this node's metrics (patterns register collectors here); see mesh.metrics.
        self.metrics = Registry()
        self.metrics.register_collector(self._collect_metrics)
        self.metrics.register_collector(self._collect_budgets)
        # node.stats on the control channel (mesh.observe): rate-limited, size-capped, and
        # under CURVE only for peers permitted "observe"
        self._stats_responder = StatsResponder(self)
        self.metrics.register_collector(self._stats_responder.collect)
        self._handlers[STATS_KIND] = self._stats_responder.on_request
        self._discovery: Any = None
        # One node per data dir: held until close (a killed process's lock goes with it).
        self._dir_lock: int | None = lock_data_dir(self.data_dir)
        try:
            # Under the lock and before any HELLO: written and fsynced first (mesh.datadir)
            self.incarnation = next_incarnation(self.data_dir)
            if "ipc" in config.transports:  # ours alone: the lock proves no live twin
                remove_stale_ipc(ipc_dir(), self.id)
            if config.security is not None:
                # imported here: a plaintext node does not load the security stack
                from mesh.security import NodeSecurity
                self.security = NodeSecurity(config.security, self.data_dir, self.context)
                self._factory.security = self.security
                if self.security.atrest_key is not None:
                    from mesh.log.directory import set_atrest_key
                    set_atrest_key(self.data_dir, self.security.atrest_key)
            self.reactor.start()
            self.reactor.run_sync(self._channel.setup)
        except BaseException:
            self._teardown()
            raise
        if config.mdns:
            self._start_discovery()
        # one WARNING when a non-loopback interface is plaintext (mesh.transport)
        warning = plaintext_warning(self.name, self._bind_host, "tcp" in config.transports,
                                    config.security is not None, config.mdns)
        if warning:
            log.warning("%s", warning)

    def _key_for_node(self, node_id: str) -> str | None:
        return self.security.key_for_node(node_id) if self.security is not None else None

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.id[:12]} mesh={self.mesh}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _start_discovery(self) -> None:
        try:
            from mesh.discovery import MdnsDiscovery  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            log.warning("node %s: mDNS discovery unavailable (%s); static peers only", self.name, exc)
            return
        try:
            self._discovery = MdnsDiscovery(self)
            self._discovery.start()
        except Exception:
            log.exception("node %s: mDNS discovery failed to start; static peers only", self.name)
            self._discovery = None

    def close(self) -> None:
        """Say BYE to peers, stop the reactor, close every socket and the context. Idempotent.

        Queued control messages get up to ``min(linger_ms, 250)`` ms to leave (a dead peer does
        not hold close for the full linger).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._factory.closed = True
        # live patterns first (they registered with on_close): their I/O threads must stop
        # before the reactor and the sockets go, else they die on ENOTSOCK
        self._closers.close_all(self.name)
        # BYE first, then the mDNS goodbye: the other order let peers mark this node gone on
        # the mDNS goodbye, then see it "joined" again on a control message still in flight,
        # then gone again on the BYE (a flap at every shutdown).
        try:
            self.reactor.run_sync(self._channel.shutdown, timeout=2.0)
        except MeshTimeout:
            # An overloaded host (the reactor did not get to it in 2 s): the BYEs may not
            # have left; peers then see this node gone by presence. Not a crash: one line.
            log.warning("node %s: goodbye to peers not sent within 2 s (host overloaded?); "
                        "closing anyway", self.name)
        except Exception:
            log.exception("node %s: shutdown on the reactor failed", self.name)
        if self._discovery is not None:
            try:
                self._discovery.close()
            except Exception:
                log.exception("node %s: closing discovery failed", self.name)
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        self._factory.closed = True
        try:
            self.reactor.stop(timeout=5.0)
        except Exception:
            log.exception("node %s: reactor stop failed", self.name)
        self._factory.close_all()
        if self.security is not None:
            self.security.close()
            if self.security.atrest_key is not None:
                from mesh.log.directory import set_atrest_key
                set_atrest_key(self.data_dir, None)
        self.context.term()
        for closer in list(self._iter_closers):
            closer()
        self._factory.remove_ipc_files()  # libzmq leaves them; before the lock goes
        fd, self._dir_lock = getattr(self, "_dir_lock", None), None
        if fd is not None:
            os.close(fd)  # drops the flock: the data dir is free for the next Node

    def on_close(self, closer: Callable[[], None]) -> Callable[[], None]:
        """Register ``closer`` (a pattern's ``close``): :meth:`close` calls it first, newest
        first, while the reactor and sockets still work. Returns the function that unregisters
        it (call it from the pattern's own close). Closing the node closes what lives on it.
        """
        return self._closers.add(closer)

    # --- sockets (mesh.sockets) ---------------------------------------------------------------

    def socket(self, socket_type: int, role: str) -> zmq.Socket[Any]:
        """Create a socket with the node's options; the one place every mesh socket is made.

        Applies LINGER, MAXMSGSIZE, SNDHWM/RCVHWM and TCP keepalive (never ZMTP heartbeats), and
        tracks the socket so :meth:`close` closes it. The caller owns it thereafter: use it on
        one thread only (the reactor's, for sockets registered with ``node.reactor``).

        Raises:
            ClosedError: the node is closed.
        """
        return self._factory.socket(socket_type, role)

    def bind(self, sock: zmq.Socket[Any], role: str) -> tuple[str, ...]:
        """Bind ``sock`` on every configured transport; announce the endpoints under ``role``.

        tcp binds the configured interface on the role's stable port (mesh.ports: recorded
        in the data dir, inside ``data_ports`` when set); ipc binds a short path in the
        per-user runtime directory. The concrete endpoints (a wildcard replaced by announceable
        addresses) are added to ``node.info().endpoints[role]``.

        Returns:
            The endpoints bound.

        Raises:
            PeerError: a bind failed (address in use, bad interface...).
            ConfigError: the ipc directory or path is unusable, or the data-port range is
                exhausted.
        """
        endpoints = self._factory.bind(sock, role)
        with self._info_lock:
            self._endpoints[role] = self._endpoints.get(role, ()) + tuple(endpoints)
            self._info = None
        if self._channel.router is not None:  # after start: tell peers and discovery
            self._info_changed()
        return tuple(endpoints)

    def unbind(self, role: str, endpoints: Sequence[str]) -> None:
        """Stop announcing ``endpoints`` (returned by :meth:`bind`) under ``role``.

        A pattern calls it when it closes the socket it bound them for, so peers and
        discovery learn at once (one UPDATE) that they are gone: a later :meth:`bind` of the
        same role (a reopened queue, a new publisher hub) is then the only one announced, and
        nobody connects to a closed endpoint. Idempotent; a no-op once the node is closed.
        """
        gone = set(endpoints)
        with self._info_lock:
            had = self._endpoints.get(role, ())
            left = tuple(e for e in had if e not in gone)
            if len(left) == len(had):
                return
            if left:
                self._endpoints[role] = left
            else:
                del self._endpoints[role]
            self._info = None
        self._factory.release(role, gone & set(had))
        if self._channel.router is not None:
            self._info_changed()

    def connect_endpoint(self, peer: PeerInfo, role: str) -> str | None:
        """The endpoint of ``peer``'s ``role`` to connect to: ipc on the same host, else tcp.

        With security on, the key ``peer`` announced is recorded as the CURVE server key of
        that endpoint (a node's sockets apply it in ``connect``), and a peer that announces no
        key gets None: there is no plaintext fallback.
        """
        return self._factory.connect_endpoint(peer, role)

    # --- self description ---------------------------------------------------------------------

    def info(self) -> PeerInfo:
        """This node's self-description (what HELLO, UPDATE and mDNS announce)."""
        with self._info_lock:
            if self._info is None:
                self._info = PeerInfo(
                    node_id=self.id,
                    name=self.name,
                    mesh=self.mesh,
                    version=PROTOCOL_VERSION,
                    host=self.host,
                    endpoints=dict(self._endpoints),
                    offers={k: tuple(sorted(v)) for k, v in self._offers.items() if v},
                    public_key=self.security.public_key if self.security is not None else None,
                    incarnation=self.incarnation,
                )
            return self._info

    def _check_offer(self, kind: str, name: str) -> None:
        if kind not in OFFER_KINDS:
            raise ConfigError(f"offer kind must be one of {OFFER_KINDS}, got {kind!r}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"offer name must be a non-empty string, got {name!r}")

    def offer(self, kind: str, name: str) -> None:
        """Announce that this node offers ``name`` of ``kind`` (stream, queue, service).

        Raises:
            ConfigError: unknown kind or empty name.
        """
        self._check_offer(kind, name)
        with self._info_lock:
            if name in self._offers[kind]:
                return
            self._offers[kind].add(name)
            self._info = None
        self._info_changed()

    def withdraw(self, kind: str, name: str) -> None:
        """Stop offering ``name`` of ``kind`` (no-op when not offered).

        Raises:
            ConfigError: unknown kind or empty name.
        """
        self._check_offer(kind, name)
        with self._info_lock:
            if name not in self._offers[kind]:
                return
            self._offers[kind].discard(name)
            self._info = None
        self._info_changed()

    def _info_changed(self) -> None:
        if self._closed:
            return
        # One UPDATE per burst of changes (10,000 offers made in a loop were 10,000 encodings
        # of a growing HELLO on the reactor: O(n^2), a busy core for a minute).
        channel = self._channel
        if not channel.update_scheduled:
            channel.update_scheduled = True
            try:
                self.reactor.call_soon(channel.announce_update)
            except ClosedError:
                return
        if self._discovery is not None:
            try:
                self._discovery.update()
            except Exception:
                log.exception("node %s: discovery update failed", self.name)

    def who_offers(
        self, kind: str, name: str | None = None, prefix: str | None = None
    ) -> list[PeerInfo]:
        """Live (joined or evasive) peers offering ``name`` (or any name with ``prefix``, or
        anything of ``kind`` when both are None).

        Raises:
            ConfigError: unknown kind.
        """
        if kind not in OFFER_KINDS:
            raise ConfigError(f"offer kind must be one of {OFFER_KINDS}, got {kind!r}")
        out = []
        for info in self.peers.list():
            names = info.offers.get(kind, ())
            if (name is not None and name in names) or (
                prefix is not None and any(n.startswith(prefix) for n in names)
            ) or (name is None and prefix is None and names):
                out.append(info)
        return out

    # --- application API ----------------------------------------------------------------------

    def on_peer(self, callback: Callable[[PeerEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on the reactor thread for every peer event.

        Returns:
            A function that unsubscribes.
        """
        with self._info_lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._info_lock:
                self._subscribers = tuple(c for c in self._subscribers if c is not callback)

        return unsubscribe

    def peer_events(self, timeout: float | None = None) -> Iterator[PeerEvent]:
        """Iterate over peer events from now on (sync). Ends when no event came for
        ``timeout`` seconds (None: never) or when the node closes."""
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        unsubscribe = self.on_peer(q.put)

        def closer() -> None:
            q.put(_CLOSED)

        self._iter_closers.add(closer)

        def gen() -> Iterator[PeerEvent]:
            try:
                while True:
                    try:
                        item = q.get(timeout=timeout)
                    except queue.Empty:
                        return
                    if item is _CLOSED:
                        return
                    yield item
            finally:
                unsubscribe()
                self._iter_closers.discard(closer)

        return gen()

    async def apeer_events(self) -> AsyncIterator[PeerEvent]:
        """Iterate over peer events from now on (asyncio); ends when the node closes."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:
                pass  # the loop is closed: nobody is listening any more

        def closer() -> None:
            put(_CLOSED)

        unsubscribe = self.on_peer(put)
        self._iter_closers.add(closer)
        try:
            while True:
                item = await q.get()
                if item is _CLOSED:
                    return
                yield item
        finally:
            unsubscribe()
            self._iter_closers.discard(closer)

    def handle(self, kind: str, handler: Callable[[str, Any], None]) -> None:
        """Route control messages of ``kind`` to ``handler(peer_id, body)`` on the reactor.

        Raises:
            ConfigError: the kind is a core kind or not a valid kind name.
        """
        try:
            control.validate_kind(kind)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        if kind in control.CORE_KINDS:
            raise ConfigError(f"{kind!r} is a core control kind")
        self._handlers[kind] = handler

    def send(self, peer_id: str, kind: str, body: object) -> None:
        """Send a control message to a live peer. Thread-safe; batched per reactor turn.

        Delivery is best effort (a peer that dies with the message in flight loses it); the
        patterns add acks where they need them.

        Raises:
            ClosedError: the node is closed.
            PeerUnreachable: the peer is unknown or gone.
            ProtocolError: invalid kind, or a body msgpack cannot encode.
            FrameTooLarge: the encoded body exceeds ``max_message_bytes``.
        """
        if self._closed:
            raise ClosedError(f"node {self.name} is closed")
        control.encode_header(kind)  # validates (cached)
        if kind in control.CORE_KINDS:
            raise ProtocolError(f"{kind!r} is a core control kind; the node sends those itself")
        with self.peers.lock:
            live = self._presence.is_live(peer_id)
        if not live:
            raise PeerUnreachable(f"peer {peer_id} is unknown or gone")
        raw = control.encode_body(body, self.config.max_message_bytes)
        self._channel.send(peer_id, kind, raw)

    def send_now(self, peer_id: str, messages: Sequence[tuple[str, object]]) -> None:
        """Send control messages to a live peer as one multipart from the calling thread, at
        once: no hand-off to the reactor and no wait for its next turn. For the few messages
        whose latency matters more than batching (a store's replication ack right after its
        fsync). Thread-safe; same delivery and errors as :meth:`send`.

        Order: what this thread sent before with :meth:`send` is never overtaken (while
        anything waits in the reactor's queue, these are queued behind it). In the reactor
        thread this is :meth:`send` of each message.

        Raises:
            ClosedError: the node is closed.
            PeerUnreachable: the peer is unknown or gone.
            ProtocolError: invalid kind, or a body msgpack cannot encode.
            FrameTooLarge: an encoded body exceeds ``max_message_bytes``.
        """
        if self._closed:
            raise ClosedError(f"node {self.name} is closed")
        raws = []
        for kind, body in messages:
            control.encode_header(kind)  # validates (cached)
            if kind in control.CORE_KINDS:
                raise ProtocolError(f"{kind!r} is a core control kind; the node sends those "
                                    "itself")
            raws.append((kind, control.encode_body(body, self.config.max_message_bytes)))
        with self.peers.lock:
            live = self._presence.is_live(peer_id)
        if not live:
            raise PeerUnreachable(f"peer {peer_id} is unknown or gone")
        if raws:
            self._channel.send_now(peer_id, raws)

    def backlogged(self, peer_id: str) -> bool:
        """True when this node's connection to ``peer_id`` is backed up: its last send hit the
        high-water mark (the peer does not read; what was sent then was dropped), or more than
        ``SEND_BATCH`` (mesh.channel) messages wait for the next flush. Reactor thread only.

        Patterns that answer a peer with much data (replay) stop serving it while this holds.
        """
        return self._channel.backlogged(peer_id)

    def permits(self, peer_id: str, action: str, resource: str) -> bool:
        """True when ``peer_id`` may do ``action`` on ``resource`` (mesh.security.perms).

        Always True with security off; with it on, deny by default. The peer is named by its
        node id and by the key it holds (bound to the id by its CURVE handshake, see
        docs/protocol.md section 5). Patterns call this where a request names a
        topic, queue or service (e.g. a replay request on the control channel).

        Raises:
            ConfigError: unknown action.
        """
        if self.security is None or peer_id == self.id:
            return True  # a node may always talk to itself (its own sockets, same key)
        row = self.peers.get(peer_id)
        key = row.public_key if row is not None else None
        allowed = self.security.allows(peer_id, key, action, resource)
        if not allowed:
            self.security.count(f"denied_{action}")
        return allowed

    def peer_by_key(self, key: str | None) -> str | None:
        """The node id whose handshake key is ``key`` (a ROUTER/XPUB frame's ``User-Id``).

        This node's own key gives its own id. Patterns use it to name the sender of a
        message by what CURVE proved, never by a routing id the sender chose. None: no known
        peer holds that key (treat the sender as a stranger: deny).
        """
        if key is None:
            return None
        if self.security is not None and key == self.security.public_key:
            return self.id
        # Cached per key and re-checked against the peer table (O(1) per message on the
        # ROUTER paths; a rotated or removed key misses and rescans).
        nid = self._key_ids.get(key)
        if nid is not None:
            row = self.peers.get(nid)
            if row is not None and row.public_key == key:
                return nid
        for row in self.peers.list():
            if row.public_key == key:
                self._key_ids[key] = row.node_id
                return row.node_id
        return None

    def stats(self) -> dict[str, Any]:
        """Counters of the control channel, the peer table and mDNS discovery (``mdns_*``,
        see :meth:`mesh.discovery.MdnsDiscovery.stats`), a snapshot."""
        out: dict[str, Any] = dict(self._counters)
        by_state = collections.Counter(r.state.value for r in self.peers.records())
        for st in PeerState:
            out[f"peers_{st.value}"] = by_state.get(st.value, 0)
        out["links"] = len(self._channel.links)
        out["dials"] = len(self._channel.dials)
        out["reactor_errors"] = self.reactor.errors
        out["dropped_outq"] = self._channel.outq_dropped
        if self.security is not None:
            out.update(self.security.stats())
        discovery = self._discovery
        if discovery is not None:  # mDNS counters and budgets, prefixed mdns_
            out.update({f"mdns_{k}": v for k, v in discovery.stats().items()})
        out.update(self._budget_stats())
        out.update(self._stats_responder.stats())
        out["metrics"] = self.metrics.as_dict()
        return out

    def _collect_metrics(self, out: Collect) -> None:
        # Scrape time (any thread): reads counters the reactor keeps; a Counter read is safe
        # under the GIL and a scrape may be one batch behind, which is fine for monitoring.
        c = self._counters
        by_state = collections.Counter(r.state.value for r in self.peers.records())
        for st in PeerState:
            out.gauge("peers", by_state.get(st.value, 0), "Peers by presence state.",
                      state=st.value)
        out.counter("control_messages_in_total", c.get("control_in", 0),
                    "Control-channel messages received.")
        out.counter("control_messages_out_total", c.get("control_out", 0),
                    "Control-channel messages sent.")
        out.counter("control_bytes_in_total", c.get("control_bytes_in", 0),
                    "Control-channel bytes received.")
        out.counter("control_bytes_out_total", c.get("control_bytes_out", 0),
                    "Control-channel bytes sent.")
        out.counter("control_dropped_total", c.get("dropped_hwm", 0)
                    + c.get("dropped_unreachable", 0),
                    "Control messages dropped (peer at HWM or unreachable).")
        out.counter("reactor_errors_total", self.reactor.errors, "Reactor callbacks that raised.")
        failures = {"auth": 0, "protocol": 0, "no_detail": 0}
        if self.security is not None:
            for k, v in self.security.stats().items():
                if k.startswith("security_handshake_failed_"):
                    failures[k[len("security_handshake_failed_"):]] = v
        for reason, v in failures.items():
            out.counter("handshake_failures_total", v, "CURVE handshakes refused.",
                        reason=reason)
        gossip.collect(c, out)
        discovery = self._discovery
        if discovery is not None:
            discovery.collect(out)

    def _budget_stats(self) -> dict[str, int]:
        # What remote peers made this node hold, and what it refused (docs/protocol.md,
        # "Budgets"); read from any thread (ints, one batch behind at worst).
        out = {**self._peer_budget.stats(), **self._dial_budget.stats()}
        out["log_lines_suppressed"] = self._log.suppressed
        out["id_claims_pending"] = len(self._membership.claims)
        return out

    def _collect_budgets(self, out: Collect) -> None:
        for b in (self._peer_budget, self._dial_budget):
            out.gauge("budget_held", b.held(), "Units held under a budget (what peers made "
                      "this node hold).", budget=b.name)
            out.counter("budget_refused_total", b.refused, "Takes refused by a budget.",
                        budget=b.name)
        c = self._counters
        for key, text in (("oversize", "Control messages over max_message_bytes dropped."),
                          ("id_claims_held", "HELLOs for a live node id from another "
                           "connection held."),
                          ("id_rebinds", "Node ids moved to a new connection."),
                          ("id_conflicts", "Node ids found held by two live processes (a "
                           "copied data dir or device image); the first one is kept."),
                          ("socket_refused", "Links refused at the socket or fd limit.")):
            out.counter(f"control_{key}_total", c.get(key, 0), text)
        out.counter("log_lines_suppressed_total", self._log.suppressed,
                    "Log lines held back by the rate limiter.")

    # --- discovery hook (any thread) ------------------------------------------------------------

    def _discovered(self, info: PeerInfo, source: str) -> None:
        if self._closed:
            raise ClosedError(f"node {self.name} is closed")
        self.reactor.call_soon(self._channel.on_discovered, info, source)

    def _discovery_goodbye(self, node_id: str) -> None:
        if self._closed:
            raise ClosedError(f"node {self.name} is closed")
        self.reactor.call_soon(self._channel.on_discovery_goodbye, node_id)

    # --- peer events (reactor thread) -----------------------------------------------------------

    def _emit(self, events: list[PeerEvent]) -> None:
        if not events:
            return
        for ev in events:
            self._counters[f"events_{ev.kind.value}"] += 1
            if ev.kind is PeerEventKind.JOINED:
                self._channel.schedule_gossip()
            for callback in self._subscribers:
                try:
                    callback(ev)
                except Exception:
                    self._counters["callback_errors"] += 1
                    self._log.log(logging.ERROR, "callback_errors",
                                  "node %s: peer event callback %r raised", self.name, callback,
                                  exc_info=True)
