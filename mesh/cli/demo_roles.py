"""The processes of ``mesh demo``: each role is a real node in its own process.

Run as ``python -m mesh.cli.demo_roles ROLE JSON-CONFIG``. Every role prints one JSON object per
line on stdout (``{"role": ..., "event": ..., ...}``) for the orchestrator in
:mod:`mesh.cli.demo_cmd`, and stops cleanly on SIGTERM.

This module is part of the application layer (``mesh.cli``), so it may use ``patterns``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mesh.log import FsyncPolicy, LogConfig
from mesh.node import Node, NodeConfig, PresenceConfig
from mesh.peers import PeerEvent, PeerEventKind

_stop = threading.Event()


def _say(role: str, event: str, **fields: Any) -> None:
    print(json.dumps({"role": role, "event": event, **fields}), flush=True)


def _node(cfg: dict[str, Any], name: str) -> Node:
    seeds = tuple(cfg.get("seeds", ()))
    node = Node(NodeConfig(
        data_dir=Path(cfg["root"]) / name, name=name, mesh=cfg["mesh"], interface="127.0.0.1",
        mdns=bool(cfg["mdns"]), seeds=seeds,
        presence=PresenceConfig(heartbeat_s=0.25, evasive_s=0.75, gone_s=2.5),
    ))

    def on_peer(ev: PeerEvent) -> None:
        if ev.kind in (PeerEventKind.JOINED, PeerEventKind.LEFT):
            _say(name, "peer", kind=ev.kind.value, peer=ev.peer.name)

    node.on_peer(on_peer)
    ctl = node.info().endpoints.get("control", ())
    _say(name, "up", pid=os.getpid(), node_id=node.id,
         control=[e for e in ctl if e.startswith("tcp://")])
    return node


def sensor(cfg: dict[str, Any], name: str) -> None:
    """Publish ``count`` readings at ``rate``/s on ``demo.readings.<name>``, then keep serving."""
    from patterns.pubsub import Publisher

    with _node(cfg, name) as node, Publisher(
        node, f"demo.readings.{name}", log_config=LogConfig(fsync=FsyncPolicy.interval(10.0)),
    ) as pub:
        count, period = int(cfg["count"]), 1.0 / float(cfg["rate"])
        start = pub.publish({"celsius": 20.0}, type="demo.reading")  # resume after a restart
        seq = start
        next_t = time.monotonic()
        last_report = 0.0
        while seq + 1 < start + count and not _stop.is_set():
            next_t += period
            _stop.wait(max(0.0, next_t - time.monotonic()))
            seq = pub.publish({"celsius": 20.0 + (seq % 50) / 10}, type="demo.reading")
            if time.monotonic() - last_report > 0.2:
                last_report = time.monotonic()
                _say(name, "published", stream=pub.stream, head=seq + 1)
        _say(name, "published", stream=pub.stream, head=seq + 1, done=True)
        _stop.wait()  # stay up: subscribers that were away replay from this node's log


def aggregator(cfg: dict[str, Any], name: str) -> None:
    """A durable subscriber of every sensor stream; resumes from its cursor after a kill."""
    from patterns.pubsub import Dedup, Subscriber

    with _node(cfg, name) as node, Subscriber(
        node, "demo.readings.", durable="aggregator", auto_commit=False,
    ) as sub:
        dedup = Dedup()
        heads: dict[str, int] = {}  # per stream: one past the highest seq seen in order
        first: dict[str, int] = {}  # per stream: the first seq this process life received
        holes = duplicates = 0
        last_report = 0.0
        while not _stop.is_set():
            for ev in sub.recv_batch(timeout=0.2):
                if ev.seq is None:
                    continue
                if not dedup.first_time(ev.id):
                    duplicates += 1
                    continue
                first.setdefault(ev.stream, ev.seq)
                expected = heads.get(ev.stream, ev.seq)
                if ev.seq > expected:  # would be a lost event: the subscriber must never do this
                    holes += ev.seq - expected
                heads[ev.stream] = max(expected, ev.seq + 1)
            if time.monotonic() - last_report > 0.3:
                last_report = time.monotonic()
                st = sub.stats()
                # Report first, then commit: whatever the cursor covers was reported, so after a
                # kill -9 the restarted aggregator must resume at or before the last report.
                _say(name, "consumed", heads=heads, first=first, holes=holes,
                     duplicates=duplicates, replayed=st.replayed, gaps_recovered=st.gaps)
                sub.commit()


ROLES = {"sensor": sensor, "aggregator": aggregator}


def main(argv: list[str]) -> int:
    role, name, raw = argv[0], argv[1], argv[2]
    signal.signal(signal.SIGTERM, lambda *_: _stop.set())
    signal.signal(signal.SIGINT, lambda *_: _stop.set())
    ROLES[role](json.loads(raw), name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
