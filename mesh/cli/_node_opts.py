"""Options and helpers shared by the CLI commands that run a node (pub, sub, push, work, call).

A one-shot command runs its own short-lived node: in a fresh temporary data directory unless
``--data-dir`` is given (then its logs, cursors and node id persist there). It finds the rest of
the mesh by mDNS, or through ``--peer ENDPOINT`` (a static peer's control endpoint, printed by
every long-running command on stderr); mDNS is off by default when a peer is given.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError, MeshTimeout


def add_node_args(p: argparse.ArgumentParser, *, one_shot: bool = True) -> None:
    """Add ``--data-dir --mesh --interface --peer --mdns/--no-mdns --json --name``."""
    p.add_argument("--data-dir", default=None,
                   help="the node's data directory (default: a temporary one, deleted at exit)"
                   if one_shot else "the node's data directory (default: a temporary one)")
    p.add_argument("--mesh", default="default", help="mesh name (default: %(default)s)")
    p.add_argument("--interface", default=None,
                   help="address or interface to bind and announce on (default: "
                        "$ZEROMESH_INTERFACE, else all)")
    p.add_argument("--peer", action="append", default=[], metavar="ENDPOINT",
                   help="a static peer's control endpoint (tcp://host:port or ipc://path); "
                        "repeatable")
    p.add_argument("--mdns", dest="mdns", action="store_true", default=None,
                   help="use mDNS discovery (default: on unless --peer is given)")
    p.add_argument("--no-mdns", dest="mdns", action="store_false")
    p.add_argument("--name", default=None, help="this node's name (default host-pid)")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON lines)")
    if not one_shot:
        p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help="serve this node's metrics on 127.0.0.1:PORT (0: any free port; "
                            "read them with `mesh stats --port PORT`)")


@contextlib.contextmanager
def open_node(args: argparse.Namespace, role: str) -> Iterator[Any]:
    """Start the command's node; announce its control endpoint on stderr; clean up at exit.

    Raises:
        ConfigError: bad options (e.g. a malformed --peer endpoint).
    """
    from mesh.node import Node, NodeConfig

    tmp: str | None = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix=f"zeromesh-{role}-")
    for ep in args.peer:
        if not ep.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"--peer must be tcp://host:port or ipc://path, got {ep!r}")
    mdns = args.mdns if args.mdns is not None else not args.peer
    try:
        node = Node(NodeConfig(data_dir=data_dir, name=args.name or None, mesh=args.mesh,
                               interface=args.interface, static_peers=tuple(args.peer),
                               mdns=mdns))
        server = None
        try:
            eps = node.info().endpoints.get("control", ())
            note(f"node {node.id[:12]} ({node.name}) control {' '.join(eps)}")
            if getattr(args, "metrics_port", None) is not None:
                from mesh.metrics import serve_prometheus

                server, port = serve_prometheus(node, port=args.metrics_port)
                note(f"metrics on http://127.0.0.1:{port}/metrics")
            yield node
        finally:
            if server is not None:
                server.close()
            node.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def note(msg: str) -> None:
    """A status line for humans on stderr (stdout carries the data)."""
    print(f"mesh: {msg}", file=sys.stderr, flush=True)


def read_data(text: str) -> bytes:
    """DATA argument: ``-`` reads stdin, ``@path`` reads a file, anything else is UTF-8 text.

    Raises:
        ConfigError: the file cannot be read.
    """
    if text == "-":
        return sys.stdin.buffer.read()
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {text[1:]}: {exc}") from exc
    return text.encode()


def payload_value(raw: bytes, as_json: bool) -> Any:
    """Bytes as sent, or (``--data-json``) the JSON value they hold.

    Raises:
        ConfigError: ``as_json`` and the data is not JSON.
    """
    if not as_json:
        return raw
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"DATA is not valid JSON: {exc}") from exc


def show_value(value: Any) -> Any:
    """A JSON-friendly form of a payload (text when bytes are UTF-8, else base64)."""
    if isinstance(value, bytes | bytearray | memoryview):
        b = bytes(value)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(b).decode()}
    if isinstance(value, dict):
        return {str(k): show_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [show_value(v) for v in value]
    return value


def human(value: Any) -> str:
    """A payload as one printable string."""
    v = show_value(value)
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def parse_since(text: str) -> dt.datetime:
    """``--since``: ISO 8601 (naive means UTC), or a relative age like ``90s``, ``10m``,
    ``2h``, ``1d``.

    Raises:
        ConfigError: neither form.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        try:
            secs = float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
        else:
            return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=secs)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--since: not a time (ISO 8601 or 90s/10m/2h/1d): {text!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` (every 10 ms) until true.

    Raises:
        MeshTimeout: still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise MeshTimeout(f"{what} within {timeout:g} s")
        time.sleep(0.01)


def positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n
