"""Options and helpers shared by the CLI commands that run a node (pub, sub, push, work, call).

A one-shot command runs its own short-lived node: in a fresh temporary data directory unless
``--data-dir`` is given (then its logs, cursors and node id persist there). It finds the rest of
the mesh by mDNS, or through ``--peer ENDPOINT`` (a static peer's control endpoint, printed by
every long-running command on stderr); mDNS is off by default when a peer is given.

Security (CURVE, mesh.security): ``--key-file`` (this node's secret key, from ``mesh keygen``),
``--allowlist DIR`` (the admitted public keys) or ``--authority DIR`` (``ca.pub`` and the
certificates, from ``mesh ca``), ``--allow RULE`` (permissions granted to every admitted peer;
default ``*:*`` with an allowlist, none beyond the certificates' with an authority) and
``--peer-key ENDPOINT=KEY`` (the CURVE key of a ``--peer``, needed before it says anything).
Every option also comes from ``$ZEROMESH_<OPTION>`` (``ZEROMESH_KEY_FILE``, ``ZEROMESH_PEER``
comma-separated, ...) and from a TOML file given by ``--config`` or ``$ZEROMESH_CONFIG`` (keys
are option names with ``_``: ``key_file = "..."``, ``peer = ["tcp://..."]``). The command
line wins over the environment, which wins over the file.
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

from mesh.errors import ConfigError, MeshError, MeshTimeout, PeerUnreachable


def add_node_args(p: argparse.ArgumentParser, *, one_shot: bool = True) -> None:
    """Add ``--data-dir --mesh --interface --peer --mdns/--no-mdns --json --name``, the
    security options, ``--config`` and ``--metrics-port``."""
    p.add_argument("--data-dir", default=None,
                   help="the node's data directory (default: a temporary one, deleted at exit)"
                   if one_shot else "the node's data directory (default: a temporary one)")
    p.add_argument("--mesh", default=None, help="mesh name (default: default)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of defaults for these options (default: $ZEROMESH_CONFIG)")
    sec = p.add_argument_group("security (CURVE)")
    sec.add_argument("--key-file", default=None, metavar="FILE",
                     help="this node's secret key (<name>.key_secret from mesh keygen); "
                          "turns CURVE on")
    sec.add_argument("--allowlist", default=None, metavar="DIR",
                     help="directory of admitted public keys (*.key)")
    sec.add_argument("--authority", default=None, metavar="DIR",
                     help="mesh authority directory (ca.pub, and certificates unless --certs)")
    sec.add_argument("--certs", default=None, metavar="DIR",
                     help="directory of signed certificates (default: the --authority dir)")
    sec.add_argument("--allow", action="append", default=None, metavar="RULE",
                     help="permission rule for every admitted peer, e.g. 'subscribe:sensors.*'"
                          " (repeatable; default '*:*' with --allowlist)")
    sec.add_argument("--peer-key", action="append", default=None, metavar="ENDPOINT=KEY",
                     help="the Z85 CURVE key of a --peer endpoint (repeatable)")
    p.add_argument("--interface", default=None,
                   help="address or interface to bind and announce on (default: "
                        "$ZEROMESH_INTERFACE, else all)")
    p.add_argument("--peer", action="append", default=[], metavar="ENDPOINT",
                   help="a static peer's control endpoint (tcp://host:port or ipc://path); "
                        "repeatable")
    p.add_argument("--mdns", dest="mdns", action="store_true", default=None,
                   help="use mDNS discovery (default: on unless --peer is given)")
    p.add_argument("--no-mdns", dest="mdns", action="store_false",
                   help="no mDNS: find peers only through --peer")
    p.add_argument("--name", default=None, help="this node's name (default host-pid)")
    p.add_argument("--port", type=port_number, default=None, metavar="PORT",
                   help="the tcp port of this node's control endpoint, the one other nodes' "
                        "--peer names (default: $ZEROMESH_PORT, else the port it had at the "
                        "last start with this --data-dir when free, else any free port)")
    p.add_argument("--data-ports", type=port_range, default=None, metavar="LO-HI",
                   help="tcp port range of this node's data endpoints (pub/sub, queues, "
                        "services), e.g. 40100-40199 for a firewall rule (default: "
                        "$ZEROMESH_DATA_PORTS, else any free port)")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON lines)")
    if one_shot:
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also print this node's id and control endpoint on stderr")
    p.set_defaults(long_running=not one_shot)
    p.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                   help="serve this node's metrics on 127.0.0.1:PORT (0: any free port; "
                        "read them with `mesh stats --port PORT`)")


# option -> kind: what resolve_options fills from $ZEROMESH_<OPTION> and the --config file
# when the command line left it unset
_SETTINGS: dict[str, str] = {
    "mesh": "str", "data_dir": "str", "interface": "str", "name": "str", "peer": "list",
    "key_file": "str", "allowlist": "str", "authority": "str", "certs": "str",
    "allow": "list", "peer_key": "list", "metrics_port": "port", "port": "port",
    "data_ports": "range",
}


def resolve_options(args: argparse.Namespace) -> None:
    """Fill unset node options from ``$ZEROMESH_<OPTION>``, then from the TOML ``--config``
    file (or ``$ZEROMESH_CONFIG``). Validates what it fills.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value has the wrong type.
    """
    import os

    path = getattr(args, "config", None) or os.environ.get("ZEROMESH_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        import tomllib
        try:
            with open(path, "rb") as f:
                file_values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config {path}: {exc}") from exc
        unknown = sorted(set(file_values) - set(_SETTINGS))
        if unknown:
            raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_SETTINGS))}")
    for opt, kind in _SETTINGS.items():
        if not hasattr(args, opt):
            continue
        cur = getattr(args, opt)
        if cur not in (None, []):
            continue
        env = os.environ.get("ZEROMESH_" + opt.upper())
        value: Any = None
        if env:
            value = [x for x in env.split(",") if x] if kind == "list" else env
        elif opt in file_values:
            value = file_values[opt]
        if value is None:
            continue
        if kind == "list":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{opt} must be a list of strings, got {value!r}")
        elif kind == "port":
            try:
                value = port_number(str(value))
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{opt}: {exc}") from None
        elif kind == "range":  # "LO-HI", or [LO, HI] in the TOML file
            from mesh.ports import parse_port_range

            value = parse_port_range(value, opt)
        elif not isinstance(value, str):
            raise ConfigError(f"{opt} must be a string, got {value!r}")
        setattr(args, opt, value)
    if getattr(args, "mesh", "") is None:
        args.mesh = "default"


def security_config(args: argparse.Namespace) -> Any:
    """The node's SecurityConfig from the security options, or None (plaintext).

    Raises:
        ConfigError: an incomplete or malformed combination.
    """
    key_file = getattr(args, "key_file", None)
    allowlist = getattr(args, "allowlist", None)
    authority = getattr(args, "authority", None)
    if not (key_file or allowlist or authority):
        for opt in ("certs", "allow", "peer_key"):
            if getattr(args, opt, None):
                raise ConfigError(f"--{opt.replace('_', '-')} needs CURVE: give --allowlist "
                                  "or --authority (and --key-file)")
        return None
    if not (allowlist or authority):
        raise ConfigError("--key-file turns CURVE on: give --allowlist DIR or --authority DIR "
                          "too (whom to admit)")
    from mesh.security import SecurityConfig

    for what, d in (("--allowlist", allowlist), ("--authority", authority)):
        if d and not Path(d).is_dir():
            raise ConfigError(f"{what} {d}: not a directory")
    peer_keys: dict[str, str] = {}
    for item in getattr(args, "peer_key", None) or ():
        ep, sep, key = item.partition("=")
        if not sep or not ep.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"--peer-key wants ENDPOINT=KEY, got {item!r}")
        peer_keys[ep] = key
    rules = list(getattr(args, "allow", None) or ())
    if not rules and allowlist:
        rules = ["*:*"]
    kw: dict[str, Any] = {"key_file": key_file, "allowlist_dir": allowlist,
                          "peer_keys": peer_keys, "permissions": {"*": rules} if rules else {}}
    if authority:
        kw["authority"] = str(Path(authority) / "ca.pub")
        kw["certs_dir"] = getattr(args, "certs", None) or authority
    return SecurityConfig(**kw)




@contextlib.contextmanager
def open_node(args: argparse.Namespace, role: str) -> Iterator[Any]:
    """Start the command's node; announce its control endpoint on stderr; clean up at exit.

    Raises:
        ConfigError: bad options (e.g. a malformed --peer endpoint).
    """
    from mesh.node import Node, NodeConfig

    resolve_options(args)
    security = security_config(args)
    tmp: str | None = None
    data_dir = args.data_dir
    for ep in args.peer:
        if not ep.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"--peer must be tcp://host:port or ipc://path, got {ep!r}")
    if data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix=f"zeromesh-{role}-")
    mdns = args.mdns if args.mdns is not None else not args.peer
    try:
        node = Node(NodeConfig(data_dir=data_dir, name=args.name or None, mesh=args.mesh,
                               interface=args.interface, static_peers=tuple(args.peer),
                               mdns=mdns, security=security, port=args.port or None,
                               data_ports=getattr(args, "data_ports", None)))
        server = None
        try:
            if getattr(args, "long_running", True) or getattr(args, "verbose", False):
                # long-running commands always say where they can be reached (a --peer for
                # the next command); one-shot ones only with -v
                eps = node.info().endpoints.get("control", ())
                note(f"node {node.id[:12]} ({node.name}) control {' '.join(eps)}")
            if getattr(args, "metrics_port", None) is not None:
                from mesh.metrics import serve_prometheus

                server, port = serve_prometheus(node, port=args.metrics_port)
                note(f"metrics on http://127.0.0.1:{port}/metrics")
            try:
                yield node
            except (MeshTimeout, PeerUnreachable) as exc:
                if security is None and (args.peer or mdns) and not node.peers.list():
                    # Nobody answered in plaintext: the usual cause is a CURVE-only mesh.
                    raise MeshError(f"{exc} (no plaintext peer answered; if the mesh requires "
                                    "CURVE, give --key-file and --allowlist or --authority)"
                                    ) from exc
                raise
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


def data_items(text: str, lines: bool) -> Iterator[bytes]:
    """The payloads of a DATA argument: one, or (``lines``) one per non-empty line. From stdin
    (``-``) lines are yielded as they arrive, so a producer piped into ``mesh pub - --lines``
    publishes each line at once (like ``mosquitto_pub -l``), not at end of input.

    Raises:
        ConfigError: the file cannot be read.
    """
    if lines and text == "-":
        for line in iter(sys.stdin.buffer.readline, b""):
            line = line.rstrip(b"\r\n")
            if line:
                yield line
        return
    raw = read_data(text)
    if lines:
        yield from (ln for ln in raw.splitlines() if ln)
    else:
        yield raw


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
    """``--since`` (the same forms in every command): ISO 8601 (naive means UTC), an age like
    ``90s``, ``10m``, ``2h``, ``1d``, or a Unix time in seconds.

    Raises:
        ConfigError: none of these forms.
    """
    try:
        return dt.datetime.fromtimestamp(float(text), dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
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
        raise ConfigError(f"--since: not a time (ISO 8601, an age like 90s/10m/2h/1d, or Unix "
                          f"seconds): {text!r}") from exc
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


def _number(kind: type, lo: float, lo_open: bool, what: str, bad: str,
            hi: float = float("inf")) -> Any:
    """An argparse type: ``kind(text)`` within [lo, hi] (``(lo, hi]`` when ``lo_open``),
    never inf or nan; anything else is a usage error saying ``what`` it must be."""
    def parse(text: str) -> Any:
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{bad}: {text!r}") from None
        if not (x > lo if lo_open else x >= lo) or not x <= hi or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        return x
    return parse


positive = _number(int, 1, False, "must be >= 1", "not an integer")
positive.__doc__ = "argparse type: an int >= 1."
non_negative = _number(int, 0, False, "must be >= 0", "not an integer")
non_negative.__doc__ = "argparse type: an int >= 0."
positive_seconds = _number(float, 0, True, "must be > 0 seconds", "not a number of seconds")
positive_seconds.__doc__ = "argparse type: a number of seconds > 0."
seconds = _number(float, 0, False, "must be >= 0 seconds", "not a number of seconds")
seconds.__doc__ = "argparse type: a number of seconds >= 0."
port_number = _number(int, 0, False, "a port is 0-65535", "not a port number", 65535)
port_number.__doc__ = "argparse type: a TCP port, 0-65535 (0: any free port)."


def port_range(text: str) -> tuple[int, int]:
    """argparse type: a tcp port range ``LO-HI`` (1 <= LO <= HI <= 65535)."""
    from mesh.ports import parse_port_range

    try:
        return parse_port_range(text, "--data-ports")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
