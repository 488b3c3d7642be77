"""The processes of ``mesh demo``: each role is a real node in its own process.

Run as ``python -m mesh.cli.demo_roles ROLE NAME JSON-CONFIG``. Every role prints one JSON
object per line on stdout (``{"role": ..., "event": ..., ...}``) for the orchestrator in
:mod:`mesh.cli.demo_cmd`, and stops cleanly on SIGTERM.

Roles:
    sensor      publishes readings on ``demo.readings.<name>`` (durable), from when a
                subscriber is connected (at most 30 s after start); with ``jobs`` it is
                also the producer of the ``demo.jobs`` work queue (one job every 5 readings, and
                one poison job that always fails); with ``calls`` it calls ``demo.calibrate``
                ten times a second.
    aggregator  a durable subscriber of ``demo.readings.``; resumes from its cursor, and
                reports what it consumed counting from that cursor (``heads``: one past
                the last seq consumed per stream; ``first``: where this life started).
    worker      a worker of ``demo.jobs`` and a responder of the ``demo.calibrate`` service.

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
POISON = b"poison: reading out of range"


def _say(role: str, event: str, **fields: Any) -> None:
    print(json.dumps({"role": role, "event": event, **fields}), flush=True)


def _node(cfg: dict[str, Any], name: str) -> Node:
    security = None
    if cfg.get("security"):
        from mesh.security import SecurityConfig

        sec = cfg["security"]
        security = SecurityConfig(
            key_file=Path(sec["keys"]) / f"{name}.key_secret", allowlist_dir=sec["allow"],
            peer_keys=dict(sec.get("peer_keys", {})), permissions=sec["permissions"])
    node = Node(NodeConfig(
        data_dir=Path(cfg["root"]) / name, name=name, mesh=cfg["mesh"], interface=cfg["interface"],
        mdns=bool(cfg["mdns"]), seeds=tuple(cfg.get("seeds", ())),
        presence=PresenceConfig(heartbeat_s=0.25, evasive_s=0.75, gone_s=2.5),
        security=security,
    ))

    def on_peer(ev: PeerEvent) -> None:
        if ev.kind in (PeerEventKind.JOINED, PeerEventKind.LEFT):
            _say(name, "peer", kind=ev.kind.value, peer=ev.peer.name)

    node.on_peer(on_peer)
    ctl = node.info().endpoints.get("control", ())
    _say(name, "up", pid=os.getpid(), node_id=node.id,
         control=[e for e in ctl if e.startswith("tcp://")])
    return node


class _Caller(threading.Thread):
    """Calls ``demo.calibrate`` ten times a second; counts answers and failures."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True)
        self.node, self.ok, self.failed, self.errors = node, 0, 0, []  # type: ignore[var-annotated]

    def run(self) -> None:
        from patterns.reqrep import Client

        while not self.node.who_offers("service", "demo.calibrate") and not _stop.is_set():
            _stop.wait(0.05)
        # calibrate is idempotent (a pure function of its input): a call whose worker is
        # killed mid-call may be sent to the other worker (the default would be OutcomeUnknown)
        with Client(self.node, retry_on_death=True) as client:
            while not _stop.is_set():
                try:
                    client.request("demo.calibrate", {"celsius": 20.0}, timeout=3.0)
                    self.ok += 1
                except Exception as exc:  # counted and shown: the demo must say if one fails
                    self.failed += 1
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                _stop.wait(0.1)


def sensor(cfg: dict[str, Any], name: str) -> None:
    """Publish ``count`` readings at ``rate``/s, then keep serving replays until stopped."""
    from patterns.pipeline import Backoff, DispatchConfig, WorkQueue
    from patterns.pubsub import Publisher

    with _node(cfg, name) as node, Publisher(
        node, f"demo.readings.{name}", log_config=LogConfig(fsync=FsyncPolicy.interval(10.0)),
    ) as pub:
        queue = None
        if cfg.get("jobs") == name:
            queue = WorkQueue(node, "demo.jobs", config=DispatchConfig(
                ack_wait=5.0, max_deliveries=3, backoff=Backoff(base=0.05, cap=0.3)))
        caller = None
        if cfg.get("calls") == name:
            caller = _Caller(node)
            caller.start()
        count, period = int(cfg["count"]), 1.0 / float(cfg["rate"])
        # Start once the aggregator is subscribed (at most 30 s): sensor-1 starts first, and
        # publishing on its own meanwhile it could finish before the aggregator is killed,
        # leaving nothing of its stream to replay after the restart.
        give_up = time.monotonic() + 30.0
        while (pub.stats().subscribers == 0 and time.monotonic() < give_up
               and not _stop.is_set()):
            _stop.wait(0.05)
        seq = pub.publish({"celsius": 20.0}, type="demo.reading")
        next_t = time.monotonic()
        last_report = 0.0
        while seq + 1 < count and not _stop.is_set():
            next_t += period
            _stop.wait(max(0.0, next_t - time.monotonic()))
            seq = pub.publish({"celsius": 20.0 + (seq % 50) / 10}, type="demo.reading")
            if queue is not None and seq % 5 == 0:
                queue.push(POISON if seq == 100 else f"job for reading {seq}".encode())
            if time.monotonic() - last_report > 0.2:
                last_report = time.monotonic()
                _report(name, pub, queue, caller, done=False)
        while not _stop.is_set():  # stay up: subscribers that were away replay from our log
            _report(name, pub, queue, caller, done=True)
            _stop.wait(0.2)
        if queue is not None:
            queue.close()


def _report(name: str, pub: Any, queue: Any, caller: _Caller | None, done: bool) -> None:
    st = pub.stats()
    fields: dict[str, Any] = {"stream": pub.stream, "head": st.head, "lag": st.lag, "done": done}
    if queue is not None:
        q = queue.stats()
        dead = [{"payload": e.payload.decode(errors="replace"), "error": e.error_message,
                 "deliveries": e.deliveries} for e in queue.dlq.list()]
        fields["jobs"] = {k: q.get(k, 0) for k in
                          ("added", "acked", "dead_lettered", "unacked", "redelivered")}
        fields["dlq"] = dead
    if caller is not None:
        fields["calls"] = {"ok": caller.ok, "failed": caller.failed, "errors": caller.errors[-3:]}
    _say(name, "published", **fields)


def aggregator(cfg: dict[str, Any], name: str) -> None:
    """A durable subscriber of every sensor stream; resumes from its cursor after a kill."""
    from patterns.pubsub import Dedup, Subscriber

    with _node(cfg, name) as node, Subscriber(
        node, "demo.readings.", durable="aggregator", auto_commit=False,
    ) as sub:
        dedup = Dedup()
        # Per stream: one past the highest seq consumed in order, and where this process life
        # started. Both start at the committed cursor: a stream consumed to its end before a
        # kill has nothing left to replay, and must still show as consumed (it showed as
        # nothing at all, and the demo waited for it until its deadline).
        cursor = {stream: pos for (_pub, stream), pos in sub.positions().items()}
        heads: dict[str, int] = dict(cursor)
        first: dict[str, int] = dict(cursor)
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
                if ev.seq > expected:  # a lost event: the subscriber must never do this
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


def worker(cfg: dict[str, Any], name: str) -> None:
    """Work ``demo.jobs`` (the poison job raises) and answer ``demo.calibrate``."""
    from patterns.pipeline import Task, Worker
    from patterns.reqrep import Incoming, Service

    handled = 0

    def job(task: Task) -> None:
        nonlocal handled
        if task.payload == POISON:
            raise ValueError("reading out of range: refusing to process it")
        handled += 1

    def calibrate(req: Incoming) -> object:
        return {"offset": -0.25, "by": name}

    with _node(cfg, name) as node, Worker(node, "demo.jobs", credit=10) as w, Service(
        node, "demo.calibrate", calibrate, concurrency=2,
    ) as svc:
        last_report = 0.0
        while not _stop.is_set():
            task = w.get(timeout=0.1)
            if task is not None:
                w.handle(task, job)
            if time.monotonic() - last_report > 0.3:
                last_report = time.monotonic()
                _say(name, "worked", handled=handled, served=svc.stats().executed)


ROLES = {"sensor": sensor, "aggregator": aggregator, "worker": worker}


def main(argv: list[str]) -> int:
    role, name, raw = argv[0], argv[1], argv[2]
    signal.signal(signal.SIGTERM, lambda *_: _stop.set())
    signal.signal(signal.SIGINT, lambda *_: _stop.set())
    ROLES[role](json.loads(raw), name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
