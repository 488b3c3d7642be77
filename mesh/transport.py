"""Transport helpers: host identity, interface addresses, ipc paths, endpoint choice, and a
receive bounded per message.

Pure or read-only functions (and :func:`recv_bounded`, which only reads a socket): the node
(mesh.node) does the binding and connecting.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import socket
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import zmq

from mesh.errors import ConfigError

__all__ = [
    "IPC_MAX_PATH",
    "announce_addresses",
    "choose_endpoint",
    "host_id",
    "interface_addresses",
    "ipc_dir",
    "ipc_path",
    "is_loopback",
    "plaintext_warning",
    "recv_bounded",
    "remove_ipc_files",
    "remove_stale_ipc",
    "resolve_interface",
]

_log = logging.getLogger(__name__)

#: sun_path is 108 bytes on Linux (104 on macOS); stay well below both.
IPC_MAX_PATH = 100

_SIOCGIFADDR = 0x8915


def host_id() -> str:
    """An id of this host: the machine id when there is one, else the host name.

    Two nodes with the same host id may talk over ipc (they share a filesystem).
    """
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return socket.gethostname()


def _iface_ipv4(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(
                s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
            )
        except OSError:
            return None  # interface without an IPv4 address, or down
    return socket.inet_ntoa(packed[20:24])


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that has one, by interface name (Linux ioctl)."""
    out: dict[str, str] = {}
    for _, name in socket.if_nameindex():
        addr = _iface_ipv4(name)
        if addr:
            out[name] = addr
    return out


def resolve_interface(interface: str) -> str:
    """Turn a configured interface (an IPv4 address, ``*``, or an interface name) into a bind host.

    Raises:
        ConfigError: neither an address nor a known interface with an IPv4 address.
    """
    if interface in ("*", "0.0.0.0", ""):
        return "*"
    try:
        ipaddress.IPv4Address(interface)
        return interface
    except ValueError:
        pass
    addr = _iface_ipv4(interface)
    if addr is None:
        raise ConfigError(f"interface {interface!r} is not an IPv4 address or a known interface")
    return addr


def announce_addresses(bind_host: str) -> list[str]:
    """Addresses peers can reach a socket bound on ``bind_host`` at.

    A wildcard bind is announced with every non-loopback IPv4 address (loopback only when there
    is nothing else: a remote peer dialling 127.0.0.1 would reach itself).
    """
    if bind_host != "*":
        return [bind_host]
    addrs = interface_addresses()
    public = [a for a in addrs.values() if not a.startswith("127.")]
    return public or ["127.0.0.1"]


def ipc_dir() -> Path:
    """A short per-user directory for ipc sockets (mode 0700), created on demand.

    ``ZEROMESH_IPC_DIR`` overrides it.

    Raises:
        ConfigError: the directory cannot be created or is not ours.
    """
    base = os.environ.get("ZEROMESH_IPC_DIR") or f"/tmp/zeromesh-{os.getuid()}"
    path = Path(base)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot create the ipc directory {path}: {exc}") from exc
    if st.st_uid != os.getuid():
        raise ConfigError(f"ipc directory {path} belongs to uid {st.st_uid}, not to us")
    return path


def ipc_path(directory: Path, node_id: str, role: str, index: int = 0) -> str:
    """The ipc socket path of one bound socket: ``<dir>/<node_id[:12]>-<role>[-n].sock``.

    Long roles are shortened with a hash so the path stays under :data:`IPC_MAX_PATH`.

    Raises:
        ConfigError: even the shortest form would be too long (``directory`` itself too long).
    """
    suffix = f"-{index}" if index else ""
    safe_role = "".join(c if c.isalnum() or c in "-_." else "_" for c in role)
    path = f"{directory}/{node_id[:12]}-{safe_role}{suffix}.sock"
    if len(path) >= IPC_MAX_PATH:
        digest = hashlib.sha1(role.encode()).hexdigest()[:10]
        path = f"{directory}/{node_id[:12]}-{digest}{suffix}.sock"
    if len(path) >= IPC_MAX_PATH:
        raise ConfigError(f"ipc path {path!r} is too long; set ZEROMESH_IPC_DIR shorter")
    return path


def choose_endpoint(
    endpoints: Mapping[str, Sequence[str]],
    role: str,
    same_host: bool,
    transports: Sequence[str] = ("tcp", "ipc"),
) -> str | None:
    """Pick the endpoint to connect to: ipc for a peer on the same host, else tcp.

    Returns:
        The endpoint, or None when the peer binds nothing usable for ``role``.
    """
    candidates = list(endpoints.get(role, ()))
    if same_host and "ipc" in transports:
        for ep in candidates:
            if ep.startswith("ipc://"):
                return ep
    if "tcp" in transports:
        for ep in candidates:
            if ep.startswith("tcp://"):
                return ep
    return None


@overload
def recv_bounded(sock: zmq.Socket[Any], max_bytes: int, flags: int = ...,
                 copy: Literal[True] = ...) -> list[bytes] | None: ...


@overload
def recv_bounded(sock: zmq.Socket[Any], max_bytes: int, flags: int = ...,
                 *, copy: Literal[False]) -> list[zmq.Frame] | None: ...


def recv_bounded(sock: zmq.Socket[Any], max_bytes: int, flags: int = 0,
                 copy: bool = True) -> list[bytes] | list[zmq.Frame] | None:
    """Receive one multipart message, refusing it when its frames add up to more than
    ``max_bytes``.

    ``ZMQ_MAXMSGSIZE`` bounds each *frame* (libzmq drops a connection that sends a larger
    one), not a message: a peer may send any number of frames of just under that size in one
    multipart, which ``recv_multipart`` would copy whole into Python. This reads frame by
    frame; once the running total passes ``max_bytes`` it keeps reading the rest of that
    message without copying it (zero-copy frames, released at once) and returns None, so the
    socket stays aligned on message boundaries and the caller only counts the refusal.

    Use it instead of ``recv_multipart`` on every socket a remote peer can write to. It costs
    what ``recv_multipart`` costs (pyzmq's own is the same frame loop), plus one addition per
    frame. libzmq itself still assembles a whole multipart before it is readable: what one
    in-flight message can occupy inside libzmq is not bounded by any 4.3 socket option.

    Args:
        sock: the socket to read.
        max_bytes: the largest total of frame sizes accepted for one message.
        flags: passed to each ``recv`` (e.g. ``zmq.NOBLOCK``); the frames after the first are
            read without blocking (libzmq delivers a multipart whole).
        copy: False returns ``zmq.Frame`` objects (e.g. to read ``frame.get("User-Id")``).

    Returns:
        The frames, or None when the message was over ``max_bytes`` (it is consumed).

    Raises:
        zmq.Again: ``flags`` has ``NOBLOCK`` and no message is waiting.
        zmq.ZMQError: the socket failed (closed, context terminated).
    """
    if copy:
        first: bytes = sock.recv(flags)
        total = len(first)
        parts: list[bytes] = [first]
        while sock.get(zmq.RCVMORE):
            if total > max_bytes:
                break
            part: bytes = sock.recv(flags)
            total += len(part)
            parts.append(part)
        if total <= max_bytes:
            return parts
        del parts
        _drain(sock)
        return None
    frame: zmq.Frame = sock.recv(flags, copy=False)
    total = len(frame)
    frames: list[zmq.Frame] = [frame]
    while frame.more:
        if total > max_bytes:
            break
        frame = sock.recv(flags, copy=False)
        total += len(frame)
        frames.append(frame)
    if total <= max_bytes:
        return frames
    more = frame.more
    del frames, frame
    if more:
        _drain(sock)
    return None


def _drain(sock: zmq.Socket[Any]) -> None:
    """Read and release the remaining frames of the current message."""
    while sock.get(zmq.RCVMORE):
        sock.recv(zmq.NOBLOCK, copy=False)


def _own_socket_files(directory: Path, node_id: str) -> list[Path]:
    prefix = f"{node_id[:12]}-"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(prefix) and name.endswith(".sock"):
            path = directory / name
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    out.append(path)
            except OSError:
                continue
    return out


def ipc_in_use(path: str | Path) -> bool:
    """True when a process listens on the ipc socket file ``path`` (an ``AF_UNIX`` connect
    does not get ``ECONNREFUSED``); False when nobody does or the file is missing. A file we
    cannot probe (no permission, not a socket) counts as in use: it is not ours to remove.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True  # its backlog is full: someone listens
    except OSError:
        return True
    finally:
        probe.close()
    return True


def remove_stale_ipc(directory: Path, node_id: str) -> int:
    """Remove the ipc socket files of ``node_id`` left in ``directory`` by an earlier run
    (a killed process leaves them; libzmq does not remove them at close either).

    Call it holding the node's data-dir lock (``node.lock``). The lock proves no other
    process runs on this data dir, but not that no other process has this node id: a copy of
    the data dir (a cloned device image) started on the same host has it too. So a file is
    removed only when nobody listens on it (:func:`ipc_in_use`); a live twin's sockets stay.
    Returns how many went.
    """
    removed = 0
    for path in _own_socket_files(directory, node_id):
        if ipc_in_use(path):
            _log.warning("ipc socket %s of this node id is in use by another process (a copy "
                         "of this data dir running on this host?); left alone", path)
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("cannot remove the stale ipc socket %s: %s", path, exc)
    return removed


def remove_ipc_files(paths: Iterable[str]) -> None:
    """Remove the ipc socket files a node bound (at its close; missing ones are skipped)."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("cannot remove the ipc socket %s: %s", p, exc)


def is_loopback(bind_host: str) -> bool:
    """True when ``bind_host`` (from :func:`resolve_interface`) is a loopback address."""
    if bind_host == "*":
        return False
    try:
        return ipaddress.IPv4Address(bind_host).is_loopback
    except ValueError:
        return False


def plaintext_warning(name: str, bind_host: str, tcp: bool, secure: bool,
                      mdns: bool) -> str | None:
    """The one-line warning for a node listening in plaintext beyond loopback, or None.

    A mesh is for the LAN, so plaintext stays the default; but anyone who can reach the
    interface can join, read and publish, and the node should say so once at start.
    """
    if secure or not tcp or is_loopback(bind_host):
        return None
    where = "all interfaces (*)" if bind_host == "*" else bind_host
    how = " and announcing on mDNS" if mdns else ""
    return (f"node {name}: listening in plaintext on {where}{how}: anyone who can reach it "
            "can join the mesh; turn CURVE on with NodeConfig(security=SecurityConfig("
            "key_file=..., allowlist_dir=...)) or `--key-file FILE --allowlist DIR` "
            "(or bind loopback: interface='127.0.0.1')")
