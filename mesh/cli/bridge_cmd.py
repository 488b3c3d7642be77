"""``mesh bridge``: run a bridge between this node's mesh and an MQTT broker or NATS JetStream.

Either ``--config FILE`` (TOML or JSON, see :mod:`patterns.bridge.config`) or flags::

    mesh bridge --data-dir gw --mesh site --kind mqtt --broker 127.0.0.1:1883 \\
        --out 'sensors.>=site/sensors/#' --in 'site/cmd/+=cmd.*'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from typing import Any

from mesh.cli._node_opts import port_number
from mesh.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mesh bridge``."""
    p = subparsers.add_parser("bridge", help="forward mesh streams to/from MQTT or NATS "
                              "JetStream (store-and-forward)")
    p.add_argument("--config", help="bridge config file (TOML, or JSON ending in .json)")
    p.add_argument("--data-dir", required=True, help="this node's data directory")
    p.add_argument("--mesh", default="default", help="mesh name")
    p.add_argument("--node-name", default=None, help="node name")
    p.add_argument("--peer", action="append", default=[], metavar="ENDPOINT",
                   help="static peer control endpoint (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="static peers only")
    p.add_argument("--interface", default=None, help="interface/IP to bind the mesh side on")
    p.add_argument("--name", help="bridge name: its durable subscription, DLQ and origin "
                   "(default: bridge-KIND)")
    p.add_argument("--kind", choices=("mqtt", "nats"), help="the broker kind")
    p.add_argument("--broker", help="MQTT host:port, or NATS server URL(s), comma-separated")
    p.add_argument("--mode", choices=("binary", "structured"), default=None,
                   help="CloudEvents mode on the broker side: attributes as headers or user "
                        "properties (binary), or one JSON document (structured); default "
                        "binary for mqtt, structured for nats")
    p.add_argument("--out", action="append", default=[], metavar="MESH=REMOTE",
                   help="outbound route: mesh stream pattern = topic/subject (repeatable)")
    p.add_argument("--in", dest="inbound", action="append", default=[], metavar="REMOTE=MESH",
                   help="inbound route: topic/subject filter = mesh stream pattern")
    p.add_argument("--username", help="broker user")
    p.add_argument("--password", help="broker password")
    p.add_argument("--ca-file", help="TLS: CA bundle (enables TLS)")
    p.add_argument("--cert-file", help="TLS: client certificate")
    p.add_argument("--key-file", help="TLS: client key")
    p.add_argument("--creds", help="NATS .creds file")
    p.add_argument("--stream", default="MESH", help="JetStream stream name")
    p.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                   help="serve this node's metrics on 127.0.0.1:PORT (0: any free port)")
    p.add_argument("--json", action="store_true",
                   help="print the final counters as one JSON object on stdout")
    p.set_defaults(func=cmd_bridge)


def _split(spec: str, what: str) -> tuple[str, str]:
    left, sep, right = spec.partition("=")
    if not sep or not left or not right:
        raise ConfigError(f"{what} route must be A=B, got {spec!r}")
    return left, right


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~patterns.bridge.config.BridgeConfig` of the command line.

    Raises:
        ConfigError: missing or invalid options.
    """
    from patterns.bridge.config import config_from_mapping, load_config

    if args.config:
        return load_config(args.config)
    if not args.kind:
        raise ConfigError("give --config FILE, or --kind with routes")
    if not args.name:
        args.name = f"bridge-{args.kind}"
    routes = [{"mesh": m, "remote": r, "direction": "out"}
              for m, r in (_split(s, "--out") for s in args.out)]
    routes += [{"mesh": m, "remote": r, "direction": "in"}
               for r, m in (_split(s, "--in") for s in args.inbound)]
    tls = None
    if args.ca_file or args.cert_file:
        tls = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    raw: dict[str, Any] = {"name": args.name, "kind": args.kind, "mode": args.mode,
                           "routes": routes}
    if args.kind == "mqtt":
        mq: dict[str, Any] = {"tls": tls, "username": args.username, "password": args.password}
        if args.broker:
            host, _, port = args.broker.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--broker must be host:port for MQTT, got {args.broker!r}")
            mq.update(host=host, port=int(port))
        raw["mqtt"] = mq
    else:
        nc: dict[str, Any] = {"tls": tls, "user": args.username, "password": args.password,
                              "creds_file": args.creds, "stream": args.stream}
        if args.broker:
            nc["servers"] = args.broker.split(",")
        raw["nats"] = nc
    return config_from_mapping(raw)


def broker_address(cfg: Any) -> str:
    """The broker the bridge dials, as a person would name it (``host:port`` / URLs)."""
    if cfg.kind == "mqtt":
        return f"{cfg.mqtt.host}:{cfg.mqtt.port}"
    return ",".join(cfg.nats.servers)


class _BrokerWatch:
    """Says when the broker connection is up, and when it is not (within
    :data:`DEAD_AFTER_S` of the start or of a loss, then again every
    :data:`REPEAT_S` while it stays down), instead of silence."""

    def __init__(self, cfg: Any, now: float | None = None) -> None:
        self.what = f"{'MQTT broker' if cfg.kind == 'mqtt' else 'NATS server'} " \
            f"{broker_address(cfg)}"
        self.up = False
        self.since = time.monotonic() if now is None else now
        self.said_down = 0.0

    def update(self, connected: bool, now: float | None = None) -> str | None:
        """The line to print for the connection state now, if any."""
        now = time.monotonic() if now is None else now
        if connected and not self.up:
            self.up, self.since, self.said_down = True, now, 0.0
            return f"connected to the {self.what}"
        if not connected and self.up:
            self.up, self.since, self.said_down = False, now, 0.0
            return (f"lost the connection to the {self.what}; reconnecting (outbound events "
                    "wait in the mesh log and are forwarded when it is back)")
        if connected or now - self.since < DEAD_AFTER_S:
            return None
        if self.said_down and now - self.said_down < REPEAT_S:
            return None
        self.said_down = now
        return (f"cannot reach the {self.what} (no connection for {now - self.since:.0f} s); "
                "still retrying: outbound events wait in the mesh log (store-and-forward) and "
                "are forwarded once it answers")


#: A broker not connected this long after the start (or a loss) is reported, and then again
#: every REPEAT_S while it stays unreachable.
DEAD_AFTER_S = 3.0
REPEAT_S = 30.0


def cmd_bridge(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT/SIGTERM; prints its counters on exit."""
    from mesh.node import Node
    from patterns.bridge import Bridge

    cfg = config_from_args(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Node(data_dir=args.data_dir, name=args.node_name, mesh=args.mesh,
              interface=args.interface, static_peers=tuple(args.peer),
              mdns=not args.no_mdns) as node, Bridge(node, cfg) as bridge:
        print(f"mesh bridge {cfg.name}: {cfg.kind}, {len(cfg.routes)} route(s), node {node.id}",
              file=sys.stderr)
        server = None
        if args.metrics_port is not None:
            from mesh.metrics import serve_prometheus

            server, port = serve_prometheus(node, port=args.metrics_port)
            print(f"mesh: metrics on http://127.0.0.1:{port}/metrics", file=sys.stderr)
        try:
            watch = _BrokerWatch(cfg)
            while not stop.wait(0.25):
                line = watch.update(bridge.stats().connected)
                if line:
                    print(f"mesh bridge {cfg.name}: {line}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            if server is not None:
                server.close()
    # After close: it waits for the forwarder's batch in flight (its broker acks), so the
    # counters printed include every event the broker acknowledged.
    if args.json:
        print(json.dumps(dataclasses.asdict(bridge.stats()), default=str))
    else:
        print(f"mesh bridge {cfg.name}: {bridge.stats()}", file=sys.stderr)
    return 0
