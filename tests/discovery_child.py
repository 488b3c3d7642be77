"""A stand-in node for discovery tests, and a child process that runs one.

``StandInNode`` has exactly the attributes :class:`mesh.discovery.MdnsDiscovery` may use
(id, name, mesh, host, config, info(), peers.upsert/goodbye): a real object, with real
zeroconf behind it, not a mock.

Run as a child: ``python -m tests.discovery_child --mesh M --service-type T --interface IP``.
It prints one JSON object per line on stdout: ``{"event": "ready", "id": ..., "t": ...}``
once discovery has started, then ``upsert`` / ``goodbye`` events with the peer id and the
wall-clock time; ``{"event": "stats", ...}`` just before exit. It exits (with a goodbye) when
stdin closes or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.discovery import DiscoveryConfig, MdnsDiscovery
from mesh.peers import PeerInfo


@dataclass
class StandInConfig:
    interface: str | None = "127.0.0.1"
    mdns: bool = True
    transports: tuple[str, ...] = ("tcp", "ipc")


class StandInPeers:
    """Thread-safe record of what discovery reported."""

    def __init__(self, on_event: Callable[[str, str, PeerInfo | None], None] | None = None
                 ) -> None:
        self._lock = threading.Lock()
        self.known: dict[str, PeerInfo] = {}
        self.gone: set[str] = set()
        self.upserts = 0
        self._on_event = on_event

    def upsert(self, info: PeerInfo, source: str = "mdns") -> None:
        assert source == "mdns"
        with self._lock:
            self.known[info.node_id] = info
            self.gone.discard(info.node_id)
            self.upserts += 1
        if self._on_event:
            self._on_event("upsert", info.node_id, info)

    def goodbye(self, node_id: str) -> None:
        with self._lock:
            self.known.pop(node_id, None)
            self.gone.add(node_id)
        if self._on_event:
            self._on_event("goodbye", node_id, None)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self.known)


@dataclass
class StandInNode:
    mesh: str
    name: str = "n"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = "h1"
    config: StandInConfig = field(default_factory=StandInConfig)
    endpoints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    offers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    public_key: str | None = None
    peers: StandInPeers = field(default_factory=StandInPeers)

    def __post_init__(self) -> None:
        if not self.endpoints:
            ip = self.config.interface or "127.0.0.1"
            self.endpoints = {"control": (f"tcp://{ip}:{40000 + int(self.id[:3], 16)}",
                                          f"ipc:///tmp/zm-{self.id[:8]}.control")}

    def info(self) -> PeerInfo:
        return PeerInfo(node_id=self.id, name=self.name, mesh=self.mesh, host=self.host,
                        endpoints=dict(self.endpoints), offers=dict(self.offers),
                        public_key=self.public_key)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mesh", required=True)
    p.add_argument("--name", default="child")
    p.add_argument("--service-type", required=True)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--offer-stream", action="append", default=[])
    p.add_argument("--reannounce", type=float, default=None)
    p.add_argument("--node", metavar="DATA_DIR", default=None,
                   help="run a real mesh.node.Node (presence events) instead of a stand-in")
    p.add_argument("--heartbeat", type=float, default=0.2)
    p.add_argument("--tcp-only", action="store_true",
                   help="no ipc: namespaces share the filesystem, so ipc would bypass the link")
    args = p.parse_args()
    lock = threading.Lock()

    def emit(obj: dict[str, object]) -> None:
        with lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def on_event(kind: str, node_id: str, info: PeerInfo | None) -> None:
        emit({"event": kind, "id": node_id, "t": time.time(),
              "name": info.name if info else None})

    if args.node:
        return run_real_node(args, emit)
    node = StandInNode(mesh=args.mesh, name=args.name,
                       config=StandInConfig(interface=args.interface),
                       offers={"stream": tuple(args.offer_stream)},
                       peers=StandInPeers(on_event))
    disc = MdnsDiscovery(node, DiscoveryConfig(service_type=args.service_type,
                                               reannounce_interval=args.reannounce))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    t0 = time.time()
    disc.start()
    emit({"event": "ready", "id": node.id, "t": t0})

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait()
    disc.close()
    emit({"event": "stats", **disc.stats()})
    return 0


def run_real_node(args: argparse.Namespace, emit: Callable[[dict[str, object]], None]) -> int:
    """A real Node: print its peer events (joined / changed / evasive / left)."""
    from mesh.node import Node, NodeConfig, PresenceConfig

    if args.service_type:
        os.environ["ZEROMESH_SERVICE_TYPE"] = args.service_type
    hb = args.heartbeat
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    t0 = time.time()
    node = Node(NodeConfig(data_dir=args.node, name=args.name, mesh=args.mesh,
                           interface=args.interface, mdns=True,
                           transports=("tcp",) if args.tcp_only else ("tcp", "ipc"),
                           presence=PresenceConfig(heartbeat_s=hb, evasive_s=3 * hb,
                                                   gone_s=6 * hb)))
    node.on_peer(lambda ev: emit({"event": ev.kind.value, "id": ev.peer.node_id,
                                  "t": time.time(), "name": ev.peer.name}))
    if args.offer_stream:
        for name in args.offer_stream:
            node.offer("stream", name)
    emit({"event": "ready", "id": node.id, "t": t0})

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait()
    disc = node._discovery
    stats = disc.stats() if disc is not None else {}
    node.close()
    emit({"event": "stats", **stats})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
