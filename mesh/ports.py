"""tcp ports of a node's binds: the data-port range, and a record of what was bound.

Every non-control bind takes a port inside ``NodeConfig(data_ports=(lo, hi))`` when a range is
set (``--data-ports``, ``$ZEROMESH_DATA_PORTS``), else an OS-chosen one. What each role bound is
recorded in ``<data_dir>/ports`` (JSON, written atomically: ``{"version": 1, "ports":
{"control": 40100, "pipe.jobs": 40101, ...}}``; a role bound twice at once has keys ``role``,
``role#1``, ...). At the next start each role binds its recorded port again when it is free
(and inside the range, when one is set), else another; peers learn the ports from the node's
HELLO over the control channel either way. For a control port that never moves, set
``NodeConfig(port=...)``.

The file is a record, never a source of truth: a missing or damaged file means "nothing
recorded" (one warning).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import zmq

from mesh.errors import ConfigError

__all__ = ["PORTS_FILE", "PortBook", "env_data_ports", "parse_port_range"]

log = logging.getLogger(__name__)

#: the file, inside the data dir, that records the port of each role
PORTS_FILE = "ports"
_VERSION = 1


def parse_port_range(value: object, what: str = "data_ports") -> tuple[int, int]:
    """``(lo, hi)`` from ``"LO-HI"`` or a 2-sequence of ints; both ends inclusive, 1-65535.

    Raises:
        ConfigError: anything else (names ``what`` and the value).
    """
    lo: object
    hi: object
    if isinstance(value, str):
        text = value.strip()
        left, sep, right = text.partition("-")
        try:
            lo, hi = int(left), int(right)
        except ValueError:
            lo = hi = None
        if not sep:
            lo = hi = None
    elif isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = value
    else:
        lo = hi = None
    if (type(lo) is not int or type(hi) is not int or not 0 < lo <= hi < 65536):
        raise ConfigError(f"{what} must be a port range LO-HI with 1 <= LO <= HI <= 65535, "
                          f"got {value!r}")
    return lo, hi


def env_data_ports() -> tuple[int, int] | None:
    """``$ZEROMESH_DATA_PORTS`` (``LO-HI``), or None when unset.

    Raises:
        ConfigError: it is set but not a port range.
    """
    text = os.environ.get("ZEROMESH_DATA_PORTS")
    if not text:
        return None
    return parse_port_range(text, "ZEROMESH_DATA_PORTS")


class PortBook:
    """The recorded port of each role of one node, and the binds that use them.

    ``bind_tcp`` is called by :meth:`mesh.node.Node.bind` (from any thread; guarded by its
    own lock) and ``release`` by :meth:`mesh.node.Node.unbind`.

    Args:
        data_dir: the node's data dir (the book lives in ``data_dir/ports``).
        data_ports: ``(lo, hi)``: every non-control role binds inside it; None: any port.
        control_port: the fixed control port, or None (then control is recorded too).
    """

    def __init__(self, data_dir: Path, data_ports: tuple[int, int] | None,
                 control_port: int | None) -> None:
        import threading

        self.path = Path(data_dir) / PORTS_FILE
        self.data_ports = data_ports
        self.control_port = control_port
        self._lock = threading.Lock()
        self._ports: dict[str, int] = self._load()
        self._live: dict[str, int] = {}  # key -> port, of the binds open now

    def _load(self) -> dict[str, int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s (%s): ports are chosen afresh", self.path, exc)
            return {}
        try:
            doc: Any = json.loads(raw)
            ports = doc["ports"] if doc.get("version") == _VERSION else None
            if not isinstance(ports, dict):
                raise ValueError("no ports")
            return {k: v for k, v in ports.items()
                    if isinstance(k, str) and type(v) is int and 0 < v < 65536}
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            log.warning("%s is damaged (%s): ports are chosen afresh", self.path, exc)
            return {}

    def _save(self) -> None:
        tmp = self.path.with_name(f".{PORTS_FILE}.{os.getpid()}.tmp")
        data = json.dumps({"version": _VERSION, "ports": self._ports}, sort_keys=True,
                          indent=1).encode() + b"\n"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError as exc:  # a hint only: the node works, its ports just may move
            log.warning("cannot record ports in %s: %s", self.path, exc)

    def recorded(self) -> dict[str, int]:
        """A copy of what the book holds (role key -> port)."""
        with self._lock:
            return dict(self._ports)

    def bind_tcp(self, sock: zmq.Socket[Any], host: str, role: str) -> int:
        """Bind ``sock`` on ``tcp://host:PORT`` for ``role`` and return the port.

        The fixed control port when configured; else a free port of the range (ports recorded
        for other roles last), or an OS-chosen one without a range. The port is recorded.

        Raises:
            ConfigError: every port of the data-port range is in use.
            zmq.ZMQError: the bind failed for another reason than a port in use.
        """
        if role == "control" and self.control_port is not None:
            sock.bind(f"tcp://{host}:{self.control_port}")
            return self.control_port
        rng = None if role == "control" else self.data_ports
        with self._lock:
            index = 0
            while self._key(role, index) in self._live:
                index += 1
            key = self._key(role, index)
            # The recorded port is bound again when it is free (inside the range when one is
            # set), so a node keeps its ports across restarts. The patterns key their
            # connections by (endpoint, CURVE key): a node back on its port with a rotated key
            # is dialled anew with the new key (tests/test_security_port_reuse.py).
            port = self._bind(sock, host, self._ports.get(key), rng, key)
            self._live[key] = port
            if self._ports.get(key) != port:
                self._ports[key] = port
                self._save()
            return port

    def release(self, role: str, port: int) -> None:
        """The bind of ``role`` on ``port`` is closed: its key is free for the next bind."""
        with self._lock:
            for key, p in list(self._live.items()):
                if p == port and (key == role or key.startswith(role + "#")):
                    del self._live[key]

    @staticmethod
    def _key(role: str, index: int) -> str:
        return role if index == 0 else f"{role}#{index}"

    def _bind(self, sock: zmq.Socket[Any], host: str, recorded: int | None,
              rng: tuple[int, int] | None, key: str) -> int:
        if recorded is not None and (rng is None or rng[0] <= recorded <= rng[1]):
            if _try_bind(sock, host, recorded):
                return recorded
            log.info("port %d of %s is taken: binding a new one", recorded, key)
        if rng is None:
            sock.bind(f"tcp://{host}:*")
            return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        others = set(self._ports.values())
        span = range(rng[0], rng[1] + 1)
        for port in (*(p for p in span if p not in others), *(p for p in span if p in others)):
            if port == recorded or port in self._live.values():
                continue
            if _try_bind(sock, host, port):
                return port
        raise ConfigError(f"data port range {rng[0]}-{rng[1]} is exhausted: no free port for "
                          f"{key} (widen --data-ports / NodeConfig(data_ports=...))")


def _try_bind(sock: zmq.Socket[Any], host: str, port: int) -> bool:
    try:
        sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    return True
