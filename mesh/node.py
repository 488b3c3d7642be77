"""The node: identity, sockets, the control channel, the peer table and presence.

A :class:`Node` owns one ZeroMQ context, one data directory (where its stable id lives), and
one :class:`~mesh.reactor.Reactor` thread that owns every socket the node uses. Public methods
are safe from any thread; they hand work to the reactor (batched, see ``send``). Patterns create
their sockets with :meth:`Node.socket` (the one place limits, and later CURVE and metrics, are
applied) and may register them with ``node.reactor``.

The control channel (docs/protocol.md): a bound ROUTER receives everything; to
talk to a peer the node connects one DEALER (routing id = our node id) to the peer's control
endpoint. HELLO / UPDATE / PING / PONG / GOSSIP / BYE are handled here; other kinds go to the
handlers registered with :meth:`Node.handle`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import hashlib
import hmac
import itertools
import logging
import os
import queue
import re
import socket as _socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq

from mesh import control
from mesh.budget import Budget, LogLimiter
from mesh.control import Hello
from mesh.errors import (
    AuthenticationFailed,
    ClosedError,
    ConfigError,
    DataDirInUse,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    UnsupportedProtocol,
)
from mesh.lifecycle import Closers
from mesh.log.directory import set_atrest_key
from mesh.metrics import Collect, Registry
from mesh.observe import STATS_KIND, StatsResponder
from mesh.peers import (
    OFFER_KINDS,
    PROTOCOL_VERSION,
    PeerEvent,
    PeerEventKind,
    PeerInfo,
    PeerRecord,
    PeerState,
    PeerTable,
    Presence,
)
from mesh.ports import PortBook, env_data_ports, parse_port_range
from mesh.reactor import Reactor, Timer
from mesh.security import NodeSecurity, SecureSocket, SecurityConfig
from mesh.transport import (
    announce_addresses,
    choose_endpoint,
    host_id,
    ipc_dir,
    ipc_path,
    plaintext_warning,
    recv_bounded,
    remove_ipc_files,
    remove_stale_ipc,
    resolve_interface,
)

__all__ = ["Node", "NodeConfig", "PresenceConfig"]

log = logging.getLogger(__name__)

_NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
#: Multiparts drained from the control ROUTER per reactor turn (fairness with other sockets).
_RECV_BATCH = 1000
#: (header, body) pairs per outgoing multipart.
_SEND_BATCH = 256
#: Messages node.send() may queue for the reactor before it drops (and counts) more.
_MAX_OUTQ = 100_000
#: Full gossip to every peer once per this many heartbeats (joins also trigger one).
_GOSSIP_EVERY = 10
#: Random bytes after the node id in a control DEALER's routing id (one per connection).
_RID_SUFFIX = 8
#: Room for headers and the routing id above max_message_bytes in one control multipart.
_MSG_SLACK = 64 << 10


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


def lock_data_dir(data_dir: Path) -> int:
    """Take ``data_dir/node.lock`` (an exclusive ``flock``, which dies with its process) and
    write our pid in it; returns the descriptor to close at the end.

    Raises:
        DataDirInUse: another live Node holds it (its pid is named).
        ConfigError: the lock file cannot be opened.
    """
    path = data_dir / "node.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or None
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DataDirInUse(str(data_dir), holder) from None
        raise ConfigError(f"cannot lock {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def load_proof_key(data_dir: Path) -> bytes:
    """Read ``data_dir/node.proof_key`` (32 random bytes, mode 0600), creating it when absent.

    A node's HELLOs carry ``HMAC(key, receiver id | endpoint)``; a receiver rebinds a node id
    at once to a new connection showing the proof the old one showed. The key lives with the
    node id, so it survives restarts and moves with the data dir, as the id does.

    Raises:
        ConfigError: the file cannot be read or written, or has the wrong size.
    """
    path = data_dir / "node.proof_key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this data dir made it first
            return load_proof_key(data_dir)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc}") from exc
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if len(key) != 32:
        raise ConfigError(f"{path} is damaged ({len(key)} bytes, expected 32); delete it "
                          "(peers then wait a moment before they believe this node's restart)")
    return key


def load_node_id(data_dir: Path) -> str:
    """Read ``data_dir/node.id``, creating it (atomic write + rename + fsync) when absent.

    Raises:
        ConfigError: the file exists but does not hold a node id, or cannot be written.
    """
    path = data_dir / "node.id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if text is not None:
        if not _NODE_ID_RE.match(text):
            raise ConfigError(f"{path} does not hold a node id (32 hex chars): {text[:40]!r}")
        return text
    node_id = uuid.uuid4().hex
    tmp = data_dir / f".node.id.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(node_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return node_id


class _Link:
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
        #: what made this dial (budget key of ``Node._dial_budget``), None when not charged
        self.origin: object = None


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
        self._bind_host = resolve_interface(
            config.interface or os.environ.get("ZEROMESH_INTERFACE") or "*"
        )
        self._control_port = config.port if config.port is not None else _env_port()
        # stable ports (mesh.ports): each role's tcp port is recorded in the data dir
        self._ports = PortBook(self.data_dir, config.data_ports or env_data_ports(),
                               self._control_port)
        self._ipc_made: set[str] = set()  # ipc socket files bound, removed at close
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
        self._sockets_lock = threading.Lock()
        self._sockets: list[zmq.Socket[Any]] = []
        self._info_lock = threading.Lock()
        self._endpoints: dict[str, tuple[str, ...]] = {}
        self._offers: dict[str, set[str]] = {k: set() for k in OFFER_KINDS}
        self._info: PeerInfo | None = None
        self._ipc_count: dict[str, int] = {}
        self._handlers: dict[str, Callable[[str, Any], None]] = {}
        self._subscribers: tuple[Callable[[PeerEvent], None], ...] = ()
        self._iter_closers: set[Callable[[], None]] = set()
        # reactor-thread state
        self._router: zmq.Socket[Any] | None = None
        self._links: dict[str, _Link] = {}
        self._dials: dict[int, _Link] = {}
        #: configured endpoint -> the node id its last answered dial reached (a proxy or NAT
        #: address the peer does not announce): a later dial to it is known to reach that node
        self._reached: dict[str, str] = {}
        self._dirty: dict[int, _Link] = {}
        self._tokens = itertools.count(1 + int.from_bytes(os.urandom(3), "big"))
        self._flush_scheduled = False
        self._gossip_scheduled = False
        self._update_scheduled = False
        self._ticks = 0
        self._heartbeat: Timer | None = None
        # cross-thread send queue (one wake-up per batch, not per message)
        self._out_lock = threading.Lock()
        self._outq: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self._out_scheduled = False
        self._outq_dropped = 0
        self._counters: collections.Counter[str] = collections.Counter()
        # Connections and node ids (docs/protocol.md, "Connections and node ids"): the
        # routing id a node id currently speaks through, set by a HELLO the connection carried.
        self._node_rid: dict[str, bytes] = {}
        self._proofs: dict[str, bytes] = {}  # node id -> the proof its bound connection showed
        # A HELLO from another connection waiting for the bound one to go quiet: node id ->
        # (connection, key, HELLO body, time, latest UPDATE body or None)
        self._claims: dict[str, tuple[bytes, str | None, Any, float, Any]] = {}
        self._claim_answered: dict[str, float] = {}
        self._id_src: dict[str, object] = {}  # node id -> the source charged for it
        # Kept in the data dir, so a restart of this node proves it is the one that spoke on
        # the old connection and rebinds its id at once (in plaintext nothing else can).
        self._proof_secret = load_proof_key(self.data_dir)
        self._msg_limit = config.max_message_bytes + _MSG_SLACK
        self._peer_budget = Budget(
            "peer_ids",
            config.max_ids_per_key if config.security is not None else config.max_ids_per_source,
            config.max_peers)
        self._dial_budget = Budget("dials", max(1, config.max_dials // 4), config.max_dials)
        #: every log line a remote peer can trigger goes through here
        self._log = LogLimiter(log)
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
        # The ZAP handler must listen before the first CURVE server binds (libzmq lets every
        # client in when no handler is there).
        self.security: NodeSecurity | None = None
        self._key_ids: dict[str, str] = {}  # CURVE key -> node id cache (peer_by_key)
        # One node per data dir: held until close (a killed process's lock goes with it).
        self._dir_lock: int | None = lock_data_dir(self.data_dir)
        try:
            if "ipc" in config.transports:  # ours alone: the lock proves no live twin
                remove_stale_ipc(ipc_dir(), self.id)
            if config.security is not None:
                self.security = NodeSecurity(config.security, self.data_dir, self.context)
                if self.security.atrest_key is not None:
                    set_atrest_key(self.data_dir, self.security.atrest_key)
            self.reactor.start()
            self.reactor.run_sync(self._setup)
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
        # live patterns first (they registered with on_close): their I/O threads must stop
        # before the reactor and the sockets go, else they die on ENOTSOCK
        self._closers.close_all(self.name)
        # BYE first, then the mDNS goodbye: the other order let peers mark this node gone on
        # the mDNS goodbye, then see it "joined" again on a control message still in flight,
        # then gone again on the BYE (a flap at every shutdown).
        try:
            self.reactor.run_sync(self._shutdown, timeout=2.0)
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
        try:
            self.reactor.stop(timeout=5.0)
        except Exception:
            log.exception("node %s: reactor stop failed", self.name)
        with self._sockets_lock:
            socks, self._sockets = self._sockets, []
        for s in socks:
            if not s.closed:
                s.close()
        if self.security is not None:
            self.security.close()
            if self.security.atrest_key is not None:
                set_atrest_key(self.data_dir, None)
        self.context.term()
        for closer in list(self._iter_closers):
            closer()
        remove_ipc_files(self._ipc_made)  # libzmq leaves them; before the lock goes
        fd, self._dir_lock = getattr(self, "_dir_lock", None), None
        if fd is not None:
            os.close(fd)  # drops the flock: the data dir is free for the next Node

    def on_close(self, closer: Callable[[], None]) -> Callable[[], None]:
        """Register ``closer`` (a pattern's ``close``): :meth:`close` calls it first, newest
        first, while the reactor and sockets still work. Returns the function that unregisters
        it (call it from the pattern's own close). Closing the node closes what lives on it.
        """
        return self._closers.add(closer)

    # --- sockets ------------------------------------------------------------------------------

    def socket(self, socket_type: int, role: str) -> zmq.Socket[Any]:
        """Create a socket with the node's options; the one place every mesh socket is made.

        Applies LINGER, MAXMSGSIZE, SNDHWM/RCVHWM and TCP keepalive (never ZMTP heartbeats), and
        tracks the socket so :meth:`close` closes it. The caller owns it thereafter: use it on
        one thread only (the reactor's, for sockets registered with ``node.reactor``).

        Raises:
            ClosedError: the node is closed.
        """
        if self._closed and not self.reactor.in_reactor_thread():
            raise ClosedError(f"node {self.name} is closed")
        try:
            sock: zmq.Socket[Any] = self.context.socket(
                socket_type, socket_class=SecureSocket if self.security is not None else None
            )
        except zmq.ZMQError as exc:
            raise ClosedError(f"node {self.name}: cannot create a {role} socket: {exc}") from exc
        c = self.config
        sock.setsockopt(zmq.LINGER, c.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, c.max_message_bytes + 4096)  # room for headers
        sock.setsockopt(zmq.SNDHWM, c.hwm)
        sock.setsockopt(zmq.RCVHWM, c.hwm)
        # No ZMTP heartbeats (HEARTBEAT_IVL): with a receive queue at its HWM they trip a
        # libzmq 4.3 assertion, `!_io_error (stream_engine_base.cpp)`, which aborts the whole
        # process (libzmq issues 3937, 4364, 4767; our chaos suite hit it under a garbage
        # flood). Presence comes from the mesh's own heartbeats; TCP keepalive lets the kernel
        # drop a connection whose peer host vanished without a FIN.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        if self.security is not None:
            self.security.apply(sock)
        with self._sockets_lock:
            self._sockets = [s for s in self._sockets if not s.closed]
            self._sockets.append(sock)
        return sock

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
        endpoints: list[str] = []
        if self.security is not None:
            self._secure_bind(sock)
        try:
            if "tcp" in self.config.transports:
                bound = self._ports.bind_tcp(sock, self._bind_host, role)  # mesh.ports
                endpoints += [f"tcp://{a}:{bound}" for a in announce_addresses(self._bind_host)]
            if "ipc" in self.config.transports:
                with self._info_lock:
                    index = self._ipc_count.get(role, 0)
                    self._ipc_count[role] = index + 1
                path = ipc_path(ipc_dir(), self.id, role, index)
                sock.bind(f"ipc://{path}")
                self._ipc_made.add(path)  # removed at close (mesh.transport)
                endpoints.append(f"ipc://{path}")
        except zmq.ZMQError as exc:
            raise PeerError(f"node {self.name}: cannot bind {role}: {exc}") from exc
        with self._info_lock:
            self._endpoints[role] = self._endpoints.get(role, ()) + tuple(endpoints)
            self._info = None
        if self._router is not None:  # after start: tell peers and discovery
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
        for ep in gone & set(had):  # its port is free for this role's next bind (mesh.ports)
            if ep.startswith("tcp://"):
                self._ports.release(role, int(ep.rsplit(":", 1)[1]))
        if self._router is not None:
            self._info_changed()

    def _secure_bind(self, sock: zmq.Socket[Any]) -> None:
        sec = self.security
        assert sec is not None
        sec.make_server(sock)
        if not sec.config.monitor:
            return
        mon = sec.monitor_socket(sock)
        with self._sockets_lock:
            self._sockets.append(mon)

        def on_monitor(m: zmq.Socket[Any]) -> None:
            if not sec.on_monitor(m):
                self.reactor.remove_reader(m)
                m.close(linger=0)

        if self.reactor.in_reactor_thread():
            self.reactor.add_reader(mon, on_monitor)
        else:
            self.reactor.call_soon(self.reactor.add_reader, mon, on_monitor)

    def connect_endpoint(self, peer: PeerInfo, role: str) -> str | None:
        """The endpoint of ``peer``'s ``role`` to connect to: ipc on the same host, else tcp.

        With security on, the key ``peer`` announced is recorded as the CURVE server key of
        that endpoint (a node's sockets apply it in ``connect``), and a peer that announces no
        key gets None: there is no plaintext fallback.
        """
        ep = choose_endpoint(
            peer.endpoints, role, peer.host == self.host, self.config.transports
        )
        if ep is not None and self.security is not None:
            if peer.public_key is None:
                self.security.count("peer_without_key")
                return None
            self.security.remember(ep, peer.public_key)
        return ep

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
        if not self._update_scheduled:
            self._update_scheduled = True
            try:
                self.reactor.call_soon(self._announce_update)
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
        if self.reactor.in_reactor_thread():
            link = self._links.get(peer_id)
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
        self.reactor.call_soon(self._drain_outq)

    def backlogged(self, peer_id: str) -> bool:
        """True when this node's connection to ``peer_id`` is backed up: its last send hit the
        high-water mark (the peer does not read; what was sent then was dropped), or more than
        :data:`_SEND_BATCH` messages wait for the next flush. Reactor thread only.

        Patterns that answer a peer with much data (replay) stop serving it while this holds.
        """
        link = self._links.get(peer_id)
        return link is not None and (link.full or len(link.out) > _SEND_BATCH)

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
        out["links"] = len(self._links)
        out["dials"] = len(self._dials)
        out["reactor_errors"] = self.reactor.errors
        with self._out_lock:
            out["dropped_outq"] = self._outq_dropped
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
        discovery = self._discovery
        if discovery is not None:
            discovery.collect(out)

    def _budget_stats(self) -> dict[str, int]:
        # What remote peers made this node hold, and what it refused (docs/protocol.md,
        # "Budgets"); read from any thread (ints, one batch behind at worst).
        out = {**self._peer_budget.stats(), **self._dial_budget.stats()}
        out["log_lines_suppressed"] = self._log.suppressed
        out["id_claims_pending"] = len(self._claims)
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
                          ("socket_refused", "Links refused at the socket or fd limit.")):
            out.counter(f"control_{key}_total", c.get(key, 0), text)
        out.counter("log_lines_suppressed_total", self._log.suppressed,
                    "Log lines held back by the rate limiter.")

    # --- discovery hook (any thread) ------------------------------------------------------------

    def _discovered(self, info: PeerInfo, source: str) -> None:
        if self._closed:
            raise ClosedError(f"node {self.name} is closed")
        self.reactor.call_soon(self._on_discovered, info, source)

    def _discovery_goodbye(self, node_id: str) -> None:
        if self._closed:
            raise ClosedError(f"node {self.name} is closed")
        self.reactor.call_soon(self._on_discovery_goodbye, node_id)

    # ================= reactor thread from here on ==============================================

    def _count(self, key: str, n: int = 1) -> None:
        self._counters[key] += n

    def _bad(self, key: str, message: str, *args: object) -> None:
        # Counted always; logged through the limiter (the first 10 per key, then one per 10 s
        # saying how many were held back), so a flood of garbage cannot flood the log too.
        self._counters[key] += 1
        self._log.warning(key, "node %s: " + message + " (%s #%d)", self.name, *args, key,
                          self._counters[key])

    def _setup(self) -> None:
        router = self.socket(zmq.ROUTER, "control")
        # ROUTER_HANDOVER: a DEALER that reconnects (same socket, same routing id) takes over
        # its half-dead old connection at once. Without it libzmq parks the newcomer as an
        # anonymous pipe whose messages are never read while the old connection lives. Every
        # DEALER has its own random routing id (_new_link), so only the socket that owns a
        # routing id can hand it over: a stranger cannot name one (docs/protocol.md,
        # "Connections and node ids").
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._router = router
        self.bind(router, "control")
        self.reactor.add_reader(router, self._on_router)
        self._heartbeat = self.reactor.call_every(self.config.presence.heartbeat_s, self._tick)
        for ep in dict.fromkeys((*self.config.static_peers, *self.config.seeds)):
            self._dial(ep, node_id=None, static=ep)
        self._flush()

    def _shutdown(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        bye = control.encode_body(None, self.config.max_message_bytes)
        linger = min(self.config.linger_ms, 250)
        # BYE on every connection a peer may have bound to our id: a dial whose HELLO the
        # peer bound but whose answer we have not read yet is the one it listens to. BYE is
        # the last message: each connection's queue is flushed with it, and nothing is
        # enqueued after it (a HELLO left on a dial and sent after the BYE on another
        # connection revived us at the peer until gone_s).
        for link in (*self._links.values(), *self._dials.values()):
            self._enqueue(link, control.BYE, bye)
        self._flush()
        for link in (*self._links.values(), *self._dials.values()):
            link.sock.close(linger=linger)
        self._links.clear()
        self._dials.clear()
        if self._router is not None:
            self.reactor.remove_reader(self._router)
            self._router.close(linger=0)

    # --- links ----------------------------------------------------------------------------------

    def _new_link(self, endpoint: str, node_id: str | None, static: str | None) -> _Link:
        try:
            sock = self.socket(zmq.DEALER, "control-out")
        except ClosedError as exc:
            if self._closed:
                raise
            # libzmq's socket limit or the fd limit: a counted refusal, not a traceback
            self._count("socket_refused")
            raise PeerError(f"no socket for a link to {endpoint}: {exc}") from exc
        # Our node id and random bytes, new for every DEALER: the routing id names the
        # connection, the HELLO it carries binds it to our node id, and nobody else can
        # present it (a stranger's DEALER with our node id is just another connection).
        sock.setsockopt(zmq.ROUTING_ID, self.id.encode("ascii") + os.urandom(_RID_SUFFIX))
        # Nothing legitimate ever arrives on a link (peers answer on their own DEALER to our
        # ROUTER) and the node never reads it: a hostile ROUTER could otherwise queue HWM
        # (10,000) messages of up to MAXMSGSIZE in it. One message, then TCP backpressure.
        sock.setsockopt(zmq.RCVHWM, 1)
        # A gossip dial knows only the id: a certificate names its key.
        if (self.security is not None and node_id is not None
                and self.security.server_key(endpoint) is None):
            self.security.remember(endpoint, self.security.key_for_node(node_id))
        try:
            sock.connect(endpoint)
        except AuthenticationFailed as exc:
            sock.close(linger=0)
            raise PeerError(str(exc)) from exc
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise PeerError(f"cannot connect to {endpoint}: {exc}") from exc
        return _Link(sock, endpoint, next(self._tokens), node_id, static, self._clock())

    def _dial(self, endpoint: str, node_id: str | None, static: str | None,
              origin: object = None) -> None:
        """Connect a DEALER whose peer has not answered yet, and send it HELLO.

        ``origin`` (who made us dial: a gossiping peer, mDNS) is charged to the dial budget
        until the dial is answered or closed; configured endpoints are not charged.
        """
        if origin is not None and not self._dial_budget.take(origin):
            self._bad("dials_refused", "dial of %s skipped: too many pending dials from %s",
                      endpoint, origin)
            return
        try:
            link = self._new_link(endpoint, node_id, static)
        except PeerError as exc:
            if origin is not None:
                self._dial_budget.give(origin)
            self._bad("dial_errors", "%s", exc)
            return
        link.origin = origin
        self._dials[link.token] = link
        self._send_hello(link)

    def _pop_dial(self, token: int) -> _Link | None:
        """Remove a pending dial (answered, adopted or closed) and return its budget."""
        d = self._dials.pop(token, None)
        if d is not None and d.origin is not None:
            self._dial_budget.give(d.origin)
            d.origin = None
        return d

    def _close_link(self, link: _Link) -> None:
        self._dirty.pop(id(link), None)
        link.sock.close(linger=0)

    def _send_hello(self, link: _Link, reply: bool = False, ack: int | None = None) -> None:
        dial = link.token if link.token in self._dials else None
        # Same for every connection of this node (its data dir's key) to that endpoint, and
        # seen by nobody else: a new connection showing it is us, not a stranger. Keyed by
        # the endpoint alone, so a static dial's first HELLO (the receiver's id not known yet)
        # carries it too, and a receiver cannot replay it to another receiver.
        proof = hmac.new(self._proof_secret, f"hello-proof|{link.endpoint}".encode(),
                         hashlib.sha256).digest()[:16]
        body = control.hello_to_wire(Hello(self.info(), dial=dial, ack=ack, reply=reply,
                                           proof=proof))
        self._enqueue(link, control.HELLO, control.encode_body(body, self.config.max_message_bytes))

    def _enqueue(self, link: _Link, kind: str, raw: bytes) -> None:
        link.out.append((kind, raw))
        link.last_sent = self._clock()
        self._dirty[id(link)] = link

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.reactor.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        for link in dirty.values():
            out, link.out = link.out, []
            if link.sock.closed:
                continue
            limit = self.config.max_message_bytes
            i = 0
            while i < len(out):
                # Up to _SEND_BATCH pairs, and at most max_message_bytes in one multipart (a
                # receiver refuses a bigger message whole: mesh.transport.recv_bounded).
                j, size = i, 0
                while j < len(out) and j - i < _SEND_BATCH:
                    n = len(out[j][1]) + 4 + control.MAX_KIND_LEN
                    if j > i and size + n > limit:
                        break
                    size += n
                    j += 1
                chunk, i = out[i:j], j
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
        with self._out_lock:
            batch, self._outq = self._outq, collections.deque()
            self._out_scheduled = False
        for peer_id, kind, raw in batch:
            link = self._links.get(peer_id)
            if link is None:
                self._count("dropped_unreachable")
                continue
            self._enqueue(link, kind, raw)
        self._flush()

    # --- receiving ------------------------------------------------------------------------------

    def _on_router(self, sock: zmq.Socket[Any]) -> None:
        # Frame by frame, bounded per message (MAXMSGSIZE bounds only a frame); zero-copy
        # frames expose the connection's properties (User-Id, Peer-Address).
        sec = self.security
        limit = self._msg_limit
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
            self._on_frames([f.bytes for f in zframes], key, zframes[0])
        self._flush()

    @staticmethod
    def _rid_node(ident: bytes) -> str | None:
        """The node id a control routing id starts with (its 32 hex chars), or None."""
        if not 32 <= len(ident) <= 64:
            return None
        try:
            nid = ident[:32].decode("ascii")
        except UnicodeDecodeError:
            return None
        return nid if _NODE_ID_RE.match(nid) else None

    def _on_frames(self, frames: list[bytes], key: str | None = None,
                   first: zmq.Frame | None = None) -> None:
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
        peer_id = self._rid_node(ident)
        now = self._clock()
        # Only the connection a node id is bound to (by the HELLO it carried) speaks for it.
        bound = peer_id is not None and self._node_rid.get(peer_id) == ident
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
                bound = peer_id is not None and self._node_rid.get(peer_id) == ident
                continue
            if not bound or peer_id is None:
                claim = self._claims.get(peer_id) if peer_id is not None else None
                if claim is not None and claim[0] == ident:
                    if m.kind == control.UPDATE:
                        # The claimant's latest state (one per claim): applied if the claim is
                        # bound, so a restarted node's offers made meanwhile are not lost.
                        assert peer_id is not None
                        self._claims[peer_id] = (*claim[:4], m.body)
                    else:  # expected while its claim is held: counted, not logged
                        self._count("claimant_messages_dropped")
                    continue
                if m.kind == control.BYE:
                    # a leaving node says BYE on every connection, bound or not: harmless
                    self._count("bye_unbound")
                    continue
                self._bad("unknown_sender", "%s from %r, which sent no valid HELLO on this "
                          "connection", m.kind, ident[:40])
                continue
            n_in += 1
            self._dispatch(peer_id, m.kind, m.body, now)
        self._counters["control_in"] += n_in  # once per multipart, not per message

    def _heard(self, peer_id: str, now: float) -> None:
        with self.peers.lock:
            events = self._presence.heard(peer_id, now)
        if events:
            # It was gone (we closed our DEALER) or evasive: make sure we can reach it again.
            row = self._presence.get(peer_id)
            if row is not None and peer_id not in self._links:
                self._connect_known(row.info)
            self._emit(events)

    def _take_dial(self, info: PeerInfo) -> _Link | None:
        """Pop a pending dial that reaches ``info``'s node (by id or by announced endpoint)."""
        peer_eps = set(info.endpoints.get("control", ()))
        for token, d in list(self._dials.items()):
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
            self._links[info.node_id] = dial
            self._send_hello(dial)
            return
        self._connect_new(info, None)

    def _dispatch(self, peer_id: str, kind: str, body: Any, now: float) -> None:
        if kind == control.PING:
            link = self._links.get(peer_id)
            if link is not None:
                echo = body if isinstance(body, int) and not isinstance(body, bool) else None
                self._enqueue(link, control.PONG, control.encode_body(echo, 64))
        elif kind == control.PONG:
            # Liveness was recorded already. A PONG echoing our link's token proves the node
            # at the endpoint we dialled answers through this bound connection: verified.
            link = self._links.get(peer_id)
            if link is not None and not link.verified and body == link.token:
                link.verified = True
                self._schedule_gossip()
        elif kind == control.UPDATE:
            try:
                hello = control.hello_from_wire(body)
            except ProtocolError as exc:
                self._bad("malformed", "UPDATE from %s: %s", peer_id, exc)
                return
            if hello.info.node_id != peer_id or hello.info.mesh != self.mesh:
                self._bad("malformed", "UPDATE from %s describes another node or mesh", peer_id)
                return
            row = self._presence.get(peer_id)
            if (self.security is not None and row is not None
                    and hello.info.public_key != row.info.public_key):
                self._bad("security_key_mismatch", "UPDATE from %s announces another key",
                          peer_id)
                return
            with self.peers.lock:
                events = self._presence.upsert(hello.info, now, "update")
            self._emit(events)
        elif kind == control.GOSSIP:
            self._on_gossip(peer_id, body)
        elif kind == control.BYE:
            # BYE is the last message of that connection: unbind it, so nothing still in
            # flight on it counts as hearing from the node (only a new HELLO brings it back).
            if self._node_rid.get(peer_id) is not None:
                del self._node_rid[peer_id]
            with self.peers.lock:
                events = self._presence.goodbye(peer_id, now)
            link = self._links.pop(peer_id, None)
            if link is not None:
                self._drop_link(link)
            self._emit(events)
        else:
            handler = self._handlers.get(kind)
            if handler is None:
                self._bad("unhandled_kind", "no handler for %r from %s", kind, peer_id)
                return
            try:
                handler(peer_id, body)
            except Exception:
                self._count("handler_errors")
                self._log.log(logging.ERROR, f"handler:{kind}",
                              "node %s: handler for %r from %s raised", self.name, kind, peer_id,
                              exc_info=True)

    def _drop_link(self, link: _Link) -> None:
        """Close a link to a gone peer; a configured endpoint is dialled again."""
        self._close_link(link)
        if link.static is not None:
            self._dial(link.static, node_id=None, static=link.static)

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
        info = hello.info
        if info.mesh != self.mesh:
            self._bad("wrong_mesh", "HELLO from mesh %r (we are %r)", info.mesh, self.mesh)
            return
        if peer_id != info.node_id:
            self._bad("malformed", "HELLO node id %s != routing id %r", info.node_id, ident[:40])
            return
        if info.node_id == self.id:
            # We dialled ourselves (our own endpoint in static_peers): forget that dial.
            if hello.dial is not None and (d := self._pop_dial(hello.dial)) is not None:
                self._close_link(d)
            return
        if self.security is not None:
            if key is None or info.public_key != key:
                self._bad("security_key_mismatch", "peer %s announces key %r but its handshake "
                          "used %r", peer_id, info.public_key, key)
                return
            cert_key = self.security.key_for_node(info.node_id)
            if cert_key is not None and cert_key != key:
                self._bad("security_key_mismatch", "peer %s: its certificate names another key "
                          "than %r", peer_id, key)
                return
        if self._node_rid.get(info.node_id) != ident:
            if not self._bind(ident, info.node_id, key, first, hello, body, now):
                return
        elif hello.proof is not None:
            self._proofs[info.node_id] = hello.proof
        self._count("control_in")
        prev = self._presence.get(info.node_id)
        was_live = prev is not None and prev.state is not PeerState.GONE
        with self.peers.lock:
            events = self._presence.upsert(info, now, "hello")
        link = self._links.get(info.node_id)
        # Adopt the dial this HELLO answers, or a dial made for this node id (gossip / mDNS).
        adopt = self._pop_dial(hello.ack) if hello.ack is not None else None
        acked = adopt is not None
        if adopt is not None:
            adopt.verified = True  # the node read our dial's HELLO and answered as itself
            if adopt.static is not None:
                self._reached[adopt.static] = info.node_id
        for token, d in list(self._dials.items()):
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
                self._links[info.node_id] = link = adopt
            else:
                link.static = link.static or adopt.static
                self._close_link(adopt)
        elif link is not None and (
            not was_live or link.endpoint not in info.endpoints.get("control", ())
        ):
            # The peer came back (restart, maybe new endpoints): fresh DEALER.
            static = link.static
            self._close_link(link)
            del self._links[info.node_id]
            link = None
            self._connect_new(info, static)
            link = self._links.get(info.node_id)
            if link is not None and not hello.reply:
                link.out.clear()  # _connect_new sent a HELLO; the reply below replaces it
        if link is None:
            self._connect_new(info, None)
            link = self._links.get(info.node_id)
            if link is not None and not hello.reply:
                link.out.clear()
        if link is not None and not hello.reply:
            self._send_hello(link, reply=True, ack=hello.dial)
        self._emit(events)

    def _source(self, key: str | None, first: zmq.Frame | None) -> object:
        """What a new node id is charged to: the CURVE key, else the source address."""
        if key is not None:
            return ("key", key)
        addr = ""
        if first is not None:
            try:
                addr = str(first.get("Peer-Address"))
            except (zmq.ZMQError, ValueError, TypeError):
                addr = ""
        return ("addr", addr or "local")

    def _may_take_over(self, peer_id: str, row: PeerRecord, key: str | None, proof: bytes | None,
                       now: float) -> bool:
        """May a new connection speak for live ``peer_id`` now (its bound one stops)?"""
        quiet = now - row.last_heard
        pres = self.config.presence
        if row.state is not PeerState.JOINED or quiet > pres.evasive_s:
            return True  # evasive or gone: its connection has been silent for evasive_s
        if self.security is not None:
            # The handshake proves the key: the node id's own key takes over at once (a
            # restart, a new DEALER); another key waits for the old one's silence above.
            return row.info.public_key == key
        # Plaintext proves nothing: the same process (its proof) at once, anyone else only
        # once the bound connection has been quiet for two heartbeats (it died: a restart).
        if proof is not None and self._proofs.get(peer_id) == proof:
            return True
        return quiet >= min(2 * pres.heartbeat_s, pres.evasive_s)

    def _bind(self, ident: bytes, peer_id: str, key: str | None, first: zmq.Frame | None,
              hello: Hello, body: Any, now: float) -> bool:
        """Bind connection ``ident`` to ``peer_id`` (True), or refuse or hold its claim."""
        cur = self._node_rid.get(peer_id)
        row = self._presence.get(peer_id)
        if row is None:
            # A node id new to this node: charged to the source that introduced it.
            if peer_id not in self._id_src:
                src = self._source(key, first)
                # Gone rows hold their budget until pruned; a full budget forgets the longest
                # gone one first, so nodes that come and go with new ids are not locked out.
                budget = self._peer_budget
                if budget.held(src) >= budget.per_key:
                    self._evict_gone(src)
                elif budget.held() >= budget.total:
                    self._evict_gone(None)
                if not budget.take(src):
                    self._bad("peer_ids_refused", "HELLO from %s refused: %s introduced too many "
                              "node ids", peer_id, src)
                    return False
                self._id_src[peer_id] = src
        elif cur is not None and not self._may_take_over(peer_id, row, key, hello.proof, now):
            # The node id is live on another connection: this one may be a stranger. Held
            # (one per node id) until the bound connection is quiet, then retried by _tick.
            self._claims[peer_id] = (ident, key, body, now, None)
            # A restart without its proof (it dialled another endpoint, or lost its data dir)
            # looks exactly like this: counted, and said at INFO, not as a warning.
            self._count("id_claims_held")
            self._log.log(logging.INFO, "id_claims_held", "node %s: HELLO for live %s from "
                           "another connection held until its bound one is quiet",
                           self.name, peer_id)
            link = self._links.get(peer_id)
            if (hello.dial is not None and not hello.reply and link is not None
                    and now - self._claim_answered.get(peer_id, -1e9)
                    >= self.config.presence.heartbeat_s):
                # It may be the node's own dial of an endpoint that reached us: the ack goes
                # out on our link, which reaches only the real node (a stranger learns nothing).
                self._claim_answered[peer_id] = now
                self._send_hello(link, reply=True, ack=hello.dial)
            return False
        if cur is not None:
            self._count("id_rebinds")
        self._node_rid[peer_id] = ident
        if hello.proof is not None:
            self._proofs[peer_id] = hello.proof
        else:
            self._proofs.pop(peer_id, None)
        self._claims.pop(peer_id, None)
        return True

    def _evict_gone(self, src: object | None) -> bool:
        """Forget the longest-gone row charged to ``src`` (to anyone when None)."""
        best: tuple[float, str] | None = None
        for nid, s in self._id_src.items():
            if src is not None and s != src:
                continue
            row = self._presence.get(nid)
            if row is not None and row.state is PeerState.GONE and (
                    best is None or row.since < best[0]):
                best = (row.since, nid)
        if best is None:
            return False
        with self.peers.lock:
            self._presence.forget(best[1])
        self._forget_peer(best[1])
        self._count("peer_ids_evicted")
        return True

    def _forget_peer(self, node_id: str) -> None:
        """A pruned row: drop its binding and claim, and return its peer budget."""
        self._node_rid.pop(node_id, None)
        self._proofs.pop(node_id, None)
        self._claims.pop(node_id, None)
        self._claim_answered.pop(node_id, None)
        src = self._id_src.pop(node_id, None)
        if src is not None:
            self._peer_budget.give(src)

    def _retry_claims(self, now: float) -> None:
        """Bind held claims whose node's bound connection went quiet; expire old ones."""
        for peer_id, (ident, key, body, t, update) in list(self._claims.items()):
            row = self._presence.get(peer_id)
            if row is None or now - t > self.config.presence.gone_s:
                del self._claims[peer_id]
                continue
            if self._may_take_over(peer_id, row, key, None, now):
                del self._claims[peer_id]
                self._count("id_claims_bound")
                self._on_hello(ident, peer_id, key, None, body, now)
                if update is not None and self._node_rid.get(peer_id) == ident:
                    self._dispatch(peer_id, control.UPDATE, update, now)

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
        ep = self.connect_endpoint(info, "control")
        if ep is None:
            self._bad("no_endpoint", "peer %s announces no usable control endpoint", info.node_id)
            return
        try:
            link = self._new_link(ep, info.node_id, static)
        except PeerError as exc:
            self._bad("dial_errors", "%s", exc)
            return
        self._links[info.node_id] = link
        self._send_hello(link)

    def _on_gossip(self, sender: str, body: Any) -> None:
        try:
            entries, bad = control.gossip_from_wire(body)
        except ProtocolError as exc:
            self._bad("malformed", "GOSSIP: %s", exc)
            return
        if bad:
            self._count("malformed", bad)
        dialling = {d.node_id or self._reached.get(d.endpoint) for d in self._dials.values()}
        dial_eps = {d.endpoint for d in self._dials.values()}
        for node_id, mesh, host, eps, key in entries:
            if node_id == self.id or mesh != self.mesh or node_id in dialling:
                continue
            if node_id in self._links or self._presence.is_live(node_id):
                continue
            if dial_eps.intersection(eps):
                continue  # a configured dial to it is pending; its answer will come
            ep = choose_endpoint({"control": eps}, "control", host == self.host,
                                 self.config.transports)
            if ep is not None and self.security is not None:
                # CURVE needs the server key to dial. Only a key our own trust store admits
                # is used: a gossiper cannot point us at a server of its choosing.
                if key is None or not self.security.store.allowed(key):
                    self.security.count("gossip_untrusted_key")
                    continue
                self.security.remember(ep, key)
            if ep is not None:
                self._count("gossip_dials")
                self._dial(ep, node_id=node_id, static=None, origin=("gossip", sender))
                dialling.add(node_id)

    def _on_discovered(self, info: PeerInfo, source: str) -> None:
        if self._closed or info.mesh != self.mesh or info.node_id == self.id:
            return  # closing: discovery may still report peers, but nothing is dialled
        if info.node_id in self._links or self._presence.is_live(info.node_id):
            return  # the control channel is authoritative for live peers
        if any(d.node_id == info.node_id for d in self._dials.values()):
            return
        ep = self.connect_endpoint(info, "control")
        if ep is not None:
            self._count(f"{source}_dials")
            self._dial(ep, node_id=info.node_id, static=None, origin=(source, None))
            self._flush()

    def _on_discovery_goodbye(self, node_id: str) -> None:
        # An mDNS goodbye is unauthenticated multicast: anyone on the LAN can send one for
        # any instance name. It takes nobody away; only the peer's own control channel does
        # (BYE, or silence past gone_s). Counted only.
        self._count("discovery_goodbyes_ignored")

    # --- periodic work --------------------------------------------------------------------------

    def _tick(self) -> None:
        # Read what is already waiting first: when this thread was busy (a big send batch, a
        # slow handler) the peers' messages are queued here, not missing, and must not make
        # them look quiet.
        if self._router is not None:
            self._on_router(self._router)
        now = self._clock()
        hb = self.config.presence.heartbeat_s
        if self._claims:
            self._retry_claims(now)
        with self.peers.lock:
            tick = self._presence.tick(now)
        for node_id in tick.pruned:
            self._forget_peer(node_id)
        for node_id in tick.gone:
            link = self._links.pop(node_id, None)
            if link is not None:
                self._drop_link(link)
        pinged = set(tick.ping)
        for node_id in tick.ping:
            link = self._links.get(node_id)
            if link is not None:
                # An evasive peer gets HELLO, not PING: if it restarted with the same id (and
                # our DEALER silently reconnected to the new process), it never heard our
                # HELLO and drops PINGs as from an unknown sender; a HELLO re-introduces us
                # and its reply brings its new info back. A live peer just answers it.
                self._send_hello(link)
        for node_id, link in self._links.items():
            # Keepalive: a peer that hears from us every heartbeat never turns evasive. The
            # PING carries the link's token; its echo verifies the link (gossip names only
            # verified peers), so an unverified link is pinged every heartbeat.
            if node_id not in pinged and (now - link.last_sent >= hb * 0.9 or not link.verified):
                self._enqueue(link, control.PING, control.encode_body(link.token, 64))
        for token, d in list(self._dials.items()):
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
        if self._ticks % _GOSSIP_EVERY == 0:
            self._gossip()
        self._emit(tick.events)
        self._flush()

    def _schedule_gossip(self) -> None:
        if not self._gossip_scheduled:
            self._gossip_scheduled = True
            self.reactor.call_soon(self._gossip)

    def _gossip(self) -> None:
        self._gossip_scheduled = False
        # Only peers this node verified itself (a live link that answered): a HELLO flood of
        # fake node ids is never passed on to the rest of the mesh.
        live = [r.info for r in self._presence.records() if r.state is not PeerState.GONE
                and (lk := self._links.get(r.info.node_id)) is not None and lk.verified]
        entries = [(i.node_id, i.mesh, i.host, i.endpoints.get("control", ()), i.public_key)
                   for i in live]
        for node_id, link in self._links.items():
            others = [e for e in entries if e[0] != node_id]
            if others and self._presence.is_live(node_id):
                raw = control.encode_body(
                    control.gossip_to_wire(others), self.config.max_message_bytes
                )
                self._enqueue(link, control.GOSSIP, raw)
                self._count("gossip_sent")
        self._flush()

    def _announce_update(self) -> None:
        self._update_scheduled = False  # before reading info(): a later change sends again
        if not self._links and not self._dials:
            return
        body = control.hello_to_wire(Hello(self.info()))
        raw = control.encode_body(body, self.config.max_message_bytes)
        # Every link and pending dial, live or not: a HELLO that left before this change
        # carried the old info, and the UPDATE follows it on the same connection (a peer that
        # was not live yet would otherwise keep the old offers for good).
        for dial in (*self._links.values(), *self._dials.values()):
            self._enqueue(dial, control.UPDATE, raw)
        self._flush()

    def _emit(self, events: list[PeerEvent]) -> None:
        if not events:
            return
        for ev in events:
            self._count(f"events_{ev.kind.value}")
            if ev.kind is PeerEventKind.JOINED:
                self._schedule_gossip()
            for callback in self._subscribers:
                try:
                    callback(ev)
                except Exception:
                    self._count("callback_errors")
                    self._log.log(logging.ERROR, "callback_errors",
                                  "node %s: peer event callback %r raised", self.name, callback,
                                  exc_info=True)
