"""The socket factory: the one place a node's sockets are made, bound and closed.

Every mesh socket gets the node's limits (LINGER, MAXMSGSIZE, HWMs, TCP keepalive), its CURVE
settings when security is on, and a place in the list the node closes at the end. Binding
takes the role's stable tcp port (mesh.ports) and a short ipc path (mesh.transport).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import zmq

from mesh.errors import ClosedError, ConfigError, PeerError
from mesh.ports import PortBook
from mesh.transport import (
    announce_addresses,
    choose_endpoint,
    ipc_dir,
    ipc_in_use,
    ipc_path,
    remove_ipc_files,
)

if TYPE_CHECKING:
    from mesh.peers import PeerInfo
    from mesh.reactor import Reactor
    from mesh.security import NodeSecurity

__all__ = ["SocketFactory"]


class SocketFactory:
    """Makes, binds and tracks the sockets of one node (see :meth:`mesh.node.Node.socket`).

    Args:
        context: the node's ZeroMQ context.
        reactor: the node's reactor (CURVE monitor sockets are read there).
        name: the node's name (error messages).
        node_id: the node's id (ipc paths start with it).
        host: the node's host id (ipc is chosen for a peer on the same host).
        bind_host: the tcp interface address to bind.
        transports: ``"tcp"`` and/or ``"ipc"``.
        ports: the stable-port book of the data dir.
        linger_ms, max_message_bytes, hwm: options of every socket.
    """

    def __init__(
        self, context: zmq.Context[Any], reactor: Reactor, *, name: str, node_id: str, host: str,
        bind_host: str, transports: tuple[str, ...], ports: PortBook, linger_ms: int,
        max_message_bytes: int, hwm: int,
    ) -> None:
        self.context = context
        self.reactor = reactor
        self.name = name
        self.node_id = node_id
        self.host = host
        self.bind_host = bind_host
        self.transports = transports
        self.ports = ports
        self.linger_ms = linger_ms
        self.max_message_bytes = max_message_bytes
        self.hwm = hwm
        #: set by the node once it is configured (CURVE on every socket made after)
        self.security: NodeSecurity | None = None
        #: True once the node is closed: only the reactor thread may still make sockets
        self.closed = False
        self._lock = threading.Lock()
        self.sockets: list[zmq.Socket[Any]] = []
        self._ipc_count: dict[str, int] = {}
        self._ipc_made: set[str] = set()  # ipc socket files bound, removed at close

    def socket(self, socket_type: int, role: str) -> zmq.Socket[Any]:
        """Create a socket with the node's options (:meth:`mesh.node.Node.socket`).

        Raises:
            ClosedError: the node is closed, or libzmq cannot make another socket.
        """
        if self.closed and not self.reactor.in_reactor_thread():
            raise ClosedError(f"node {self.name} is closed")
        security = self.security
        if security is not None:
            from mesh.security import SecureSocket
            socket_class: Any = SecureSocket
        else:
            socket_class = None
        try:
            sock: zmq.Socket[Any] = self.context.socket(socket_type, socket_class=socket_class)
        except zmq.ZMQError as exc:
            raise ClosedError(f"node {self.name}: cannot create a {role} socket: {exc}") from exc
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + 4096)  # room for headers
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        # No ZMTP heartbeats (HEARTBEAT_IVL): with a receive queue at its HWM they trip a
        # libzmq 4.3 assertion, `!_io_error (stream_engine_base.cpp)`, which aborts the whole
        # process (libzmq issues 3937, 4364, 4767; our chaos suite hit it under a garbage
        # flood). Presence comes from the mesh's own heartbeats; TCP keepalive lets the kernel
        # drop a connection whose peer host vanished without a FIN.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        if security is not None:
            security.apply(sock)
        with self._lock:
            self.sockets = [s for s in self.sockets if not s.closed]
            self.sockets.append(sock)
        return sock

    def bind(self, sock: zmq.Socket[Any], role: str) -> list[str]:
        """Bind ``sock`` on every transport; returns the concrete endpoints
        (:meth:`mesh.node.Node.bind`).

        Raises:
            PeerError: a bind failed.
            ConfigError: the ipc directory or path is unusable, or the port range is exhausted.
        """
        endpoints: list[str] = []
        if self.security is not None:
            self._secure_bind(sock)
        try:
            if "tcp" in self.transports:
                bound = self.ports.bind_tcp(sock, self.bind_host, role)  # mesh.ports
                endpoints += [f"tcp://{a}:{bound}" for a in announce_addresses(self.bind_host)]
            if "ipc" in self.transports:
                path = self._free_ipc_path(role)
                sock.bind(f"ipc://{path}")
                self._ipc_made.add(path)  # removed at close (mesh.transport)
                endpoints.append(f"ipc://{path}")
        except zmq.ZMQError as exc:
            raise PeerError(f"node {self.name}: cannot bind {role}: {exc}") from exc
        return endpoints

    def _free_ipc_path(self, role: str) -> str:
        """The next ipc path of ``role`` nobody listens on. libzmq unlinks the file of an ipc
        endpoint it binds, so binding a path a live process listens on (a copy of this data
        dir on the same host: the same node id) would steal that process's socket."""
        directory = ipc_dir()
        for _ in range(64):
            with self._lock:
                index = self._ipc_count.get(role, 0)
                self._ipc_count[role] = index + 1
            path = ipc_path(directory, self.node_id, role, index)
            if not ipc_in_use(path):
                return path
        raise ConfigError(f"node {self.name}: every ipc path of role {role!r} is in use by "
                          "another process with this node id")

    def release(self, role: str, endpoints: set[str]) -> None:
        """The tcp ports of ``endpoints`` are free for this role's next bind (mesh.ports)."""
        for ep in endpoints:
            if ep.startswith("tcp://"):
                self.ports.release(role, int(ep.rsplit(":", 1)[1]))

    def _secure_bind(self, sock: zmq.Socket[Any]) -> None:
        sec = self.security
        assert sec is not None
        sec.make_server(sock)
        if not sec.config.monitor:
            return
        mon = sec.monitor_socket(sock)
        with self._lock:
            self.sockets.append(mon)

        def on_monitor(m: zmq.Socket[Any]) -> None:
            if not sec.on_monitor(m):
                self.reactor.remove_reader(m)
                m.close(linger=0)

        if self.reactor.in_reactor_thread():
            self.reactor.add_reader(mon, on_monitor)
        else:
            self.reactor.call_soon(self.reactor.add_reader, mon, on_monitor)

    def connect_endpoint(self, peer: PeerInfo, role: str) -> str | None:
        """The endpoint of ``peer``'s ``role`` to connect to (:meth:`mesh.node.Node.connect_endpoint`)."""
        ep = choose_endpoint(peer.endpoints, role, peer.host == self.host, self.transports)
        if ep is not None and self.security is not None:
            if peer.public_key is None:
                self.security.count("peer_without_key")
                return None
            self.security.remember(ep, peer.public_key)
        return ep

    def close_all(self) -> None:
        """Close every socket made here (after the reactor stopped)."""
        with self._lock:
            socks, self.sockets = self.sockets, []
        for s in socks:
            if not s.closed:
                s.close()

    def remove_ipc_files(self) -> None:
        """Remove the ipc socket files bound (libzmq leaves them)."""
        remove_ipc_files(self._ipc_made)
