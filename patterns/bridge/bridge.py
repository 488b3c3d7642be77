"""The bridge: a node role that forwards mesh streams to a broker and broker messages in.

Outbound (store-and-forward), one thread per outbound route::

    durable Subscriber (auto_commit=False) -> recv_batch -> map -> broker publish
        -> wait for every broker ack (PUBACK / PubAck) -> Subscriber.commit()

While the broker is unreachable the same batch is retried every ``retry_s``; the events stay in
the publishers' logs, and the cursor does not move, so a crash (even SIGKILL) at any point
re-sends at most the uncommitted batch: duplicates are bounded by ``batch`` and carry the
event id (MQTT user property ``id``; ``Nats-Msg-Id``, which JetStream's dedup window drops).

Inbound, on the broker client's thread::

    broker message -> loop check -> map -> Publisher.publish_event (mesh log append) -> ack

A message that cannot be mapped (it claims to be a CloudEvent and is not a valid one, has no
route, or is too large) is written to the DLQ log ``<bridge name>.dlq`` of the node's data
directory (``queues/streams/``, see :func:`patterns.pipeline.store.pipeline_root`) in the pipeline's dead-letter record layout (``mesh dlq list DIR NAME`` shows it),
then acked: it would fail the same way again. A mesh log failure is not acked: the broker
redelivers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from mesh.envelope import Event
from mesh.errors import (
    ClosedError,
    CodecError,
    ConfigError,
    LogError,
    MalformedEvent,
    MeshError,
)
from mesh.log import FsyncPolicy, Log, LogConfig
from patterns.bridge.base import BrokerClient
from patterns.bridge.config import BridgeConfig
from patterns.bridge.mapping import (
    DEFAULT_MODE,
    LoopGuard,
    Message,
    Mode,
    Route,
    event_to_message,
    origin_of,
    safe_message_to_event,
)
from patterns.pipeline.store import pipeline_root
from patterns.pubsub import Publisher, Start, Subscriber

__all__ = ["Bridge", "BridgeStats"]

_log = logging.getLogger("zeromesh.bridge")

#: Test hook: SIGKILL this process when the Nth inbound message was received, before the mesh
#: append (proves the broker redelivers what the bridge had not acked).
KILL_BEFORE_APPEND_ENV = "ZEROMESH_BRIDGE_TEST_KILL_BEFORE_APPEND"
#: DLQ record version (same layout as patterns.pipeline.dlq records).
DLQ_VERSION = 1


@dataclass
class BridgeStats:
    """Counters of one bridge.

    Attributes:
        connected: the broker connection is up.
        forwarded: events acknowledged by the broker (outbound).
        batches: outbound batches committed.
        retries: outbound attempts that did not get every ack (broker away or slow).
        skipped: outbound events not forwarded (came in through this bridge, no route, or not
            a valid CloudEvent: an envelope from another encoder; logged).
        received: inbound messages received from the broker.
        appended: inbound events appended to the mesh.
        looped: inbound messages recognised as our own events coming back (acked, dropped).
        dead_lettered: inbound messages written to the DLQ.
        append_failed: inbound messages not acked because the mesh append failed.
    """

    connected: bool = False
    forwarded: int = 0
    batches: int = 0
    retries: int = 0
    skipped: int = 0
    received: int = 0
    appended: int = 0
    looped: int = 0
    dead_lettered: int = 0
    append_failed: int = 0


class Bridge:
    """Forwards mesh streams to an MQTT broker or NATS JetStream, and broker messages in.

    Example::

        cfg = BridgeConfig(name="site", kind="mqtt", mqtt=MqttConfig(port=1883),
                           routes=(Route("sensors.>", "site/sensors/#", "out", "mqtt"),))
        with Node(data_dir="gw", mdns=False) as node, Bridge(node, cfg):
            ...

    Args:
        node: the started node the bridge runs on.
        config: the bridge settings.
        client: a ready broker client (tests); default one built from ``config``.
        start: where outbound subscriptions begin the first time (default the beginning).

    Raises:
        ConfigError: bad settings, or the client library of ``config.kind`` is not installed
            (the message names the extra to install).
    """

    def __init__(self, node: Any, config: BridgeConfig, *, client: BrokerClient | None = None,
                 start: Start | None = None) -> None:
        self.node = node
        self.config = config
        self.origin = config.origin or f"{getattr(node, 'mesh', 'mesh')}/{config.name}"
        self.guard = LoopGuard(self.origin)
        self._stats = BridgeStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._publishers: dict[str, Publisher] = {}
        self._threads: list[threading.Thread] = []
        self._dlq: Log | None = None
        self._errors: list[BaseException] = []
        self._start = start or Start.beginning()
        kill = os.environ.get(KILL_BEFORE_APPEND_ENV)
        self._kill_at = int(kill) if kill else 0
        self._out_routes = [r for r in config.routes if r.outbound]
        self._in_routes = [r for r in config.routes if r.inbound]
        self.client: BrokerClient = client or self._make_client()
        self._closed = False
        self._started = False

    def _make_client(self) -> BrokerClient:
        cfg = self.config
        if cfg.kind == "mqtt":
            from patterns.bridge.mqtt import MqttClient

            return MqttClient(cfg.mqtt, cfg.mqtt.client_id or f"zeromesh-{cfg.name}")
        from patterns.bridge.nats import NatsClient

        subjects = sorted({r.remote for r in cfg.routes})
        return NatsClient(cfg.nats, f"zeromesh-{cfg.name}", subjects)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Bridge:
        """Connect to the broker (in the background) and start forwarding. Idempotent."""
        if self._started:
            return self
        self._started = True
        # A node role: peers (and `mesh peers`) see which node bridges to which broker.
        offer = getattr(self.node, "offer", None)
        if offer is not None:
            offer("service", f"bridge.{self.config.name}")
        self.client.start([r.remote for r in self._in_routes],
                          self._on_inbound if self._in_routes else None)
        for i, route in enumerate(self._out_routes):
            t = threading.Thread(target=self._outbound, args=(i, route), daemon=True,
                                 name=f"zeromesh-bridge-out-{i}")
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        """Stop forwarding, disconnect, close the mesh publishers. Idempotent.

        Events handed to the broker but not yet acknowledged stay uncommitted: they are sent
        again by the next run.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for t in self._threads:
            t.join(15)
        self.client.close()
        withdraw = getattr(self.node, "withdraw", None)
        if withdraw is not None and self._started:
            try:
                withdraw("service", f"bridge.{self.config.name}")
            except MeshError as exc:  # the node may already be closing
                _log.debug("bridge %s: withdraw: %s", self.config.name, exc)
        with self._lock:
            for p in self._publishers.values():
                p.close()
            self._publishers.clear()
            if self._dlq is not None:
                self._dlq.close()
                self._dlq = None

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> BridgeStats:
        """A snapshot of the counters."""
        s = BridgeStats(**self._stats.__dict__)
        s.connected = self.client.connected()
        return s

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the broker connection."""
        deadline = time.monotonic() + timeout
        while not self.client.connected():
            if time.monotonic() >= deadline:
                return False
            self._stop.wait(0.02)  # polling a connection flag, bounded by the deadline
        return True

    # -- outbound -----------------------------------------------------------------------------

    def _outbound(self, index: int, route: Route) -> None:
        cfg = self.config
        try:
            sub = Subscriber(self.node, route.subscription_prefix(),
                             durable=f"bridge.{cfg.name}.{index}", auto_commit=False,
                             start=self._start)
        except MeshError as exc:
            _log.error("bridge %s: cannot subscribe to %s: %s", cfg.name, route.mesh, exc)
            self._errors.append(exc)
            return
        mode: Mode = cfg.mode if cfg.mode is not None else DEFAULT_MODE[cfg.kind]
        extra: Callable[[Event], dict[str, str] | None] = (
            (lambda ev: {"Nats-Msg-Id": ev.id}) if cfg.kind == "nats" else (lambda ev: None))
        try:
            while not self._stop.is_set():
                try:
                    events = sub.recv_batch(timeout=0.2, max_events=cfg.batch)
                except ClosedError:
                    return
                if not events:
                    continue
                msgs: list[Message] = []
                for ev in events:
                    topic = route.to_remote(ev.stream)
                    if topic is None or self.guard.outbound_is_loop(ev):
                        self._stats.skipped += 1
                        continue
                    try:
                        msgs.append(event_to_message(ev, topic, kind=cfg.kind, mode=mode,
                                                     origin=self.origin, extra_attrs=extra(ev)))
                    except MalformedEvent as exc:
                        # Only an event decoded from another encoder can get here (the Event
                        # constructor refuses what a CloudEvent may not hold): skip, say so.
                        self._stats.skipped += 1
                        _log.warning("bridge %s: event %r is not a valid CloudEvent, not "
                                     "forwarded: %s", cfg.name, ev.id, exc)
                if msgs and not self._send_all(msgs, [e.id for e in events]):
                    return  # stopping: nothing committed, the next run re-sends this batch
                sub.commit()
                self._stats.batches += 1
        finally:
            sub.close()

    def _send_all(self, msgs: list[Message], ids: list[str]) -> bool:
        """Publish until every message is acked; False when the bridge stops first."""
        cfg = self.config
        self.guard.sent(ids)
        pending = msgs
        while pending:
            if self._stop.is_set():
                return False
            try:
                done = self.client.publish_batch(pending, cfg.ack_timeout_s)
            except Exception as exc:  # a client library bug must not kill the forwarder
                _log.warning("bridge %s: publish failed: %r", cfg.name, exc)
                done = 0
            self._stats.forwarded += done
            pending = pending[done:]
            if pending:
                self._stats.retries += 1
                self._stop.wait(cfg.retry_s)  # broker away: back off before the next try
        return True

    # -- inbound (broker client thread) ------------------------------------------------------

    def _publisher(self, stream: str) -> Publisher:
        with self._lock:
            if self._closed:
                raise ClosedError("bridge is closed")
            pub = self._publishers.get(stream)
            if pub is None:
                pub = self._publishers[stream] = Publisher(self.node, stream)
            return pub

    def _on_inbound(self, msg: Message, ack: Callable[[], None]) -> None:
        st = self._stats
        st.received += 1
        if self._kill_at and st.received >= self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die before the append
        kind = self.config.kind
        eid, org = origin_of(msg, kind)
        if self.guard.inbound_is_loop(eid, org):
            st.looped += 1
            ack()
            return
        stream = None
        for r in self._in_routes:
            stream = r.to_mesh(msg.topic)
            if stream is not None:
                break
        if stream is None:
            self._dead_letter(msg, "no_route", None)
            ack()
            return
        try:
            ev = safe_message_to_event(msg, kind=kind, origin=self.origin)
            self._publisher(stream).publish_event(ev)
        except CodecError as exc:
            self._dead_letter(msg, "malformed", exc)
            ack()
            return
        except (LogError, ClosedError, ConfigError) as exc:
            # Not in the log: no ack, the broker redelivers (MQTT on reconnect, JetStream after
            # ack_wait).
            st.append_failed += 1
            _log.warning("bridge %s: mesh append failed for %s: %s", self.config.name,
                         msg.topic, exc)
            return
        st.appended += 1
        ack()

    def _dead_letter(self, msg: Message, reason: str, exc: BaseException | None) -> None:
        """Append ``msg`` with the reason to ``<name>.dlq`` (pipeline DLQ record layout)."""
        with self._lock:
            if self._dlq is None:
                # The DLQ namespace of the data directory (read by DeadLetters / mesh dlq).
                root = pipeline_root(Path(self.node.data_dir))
                self._dlq = root.open(f"{self.config.name}.dlq",
                                      LogConfig(fsync=FsyncPolicy.always()))
            now = time.time()
            rec = {
                "v": DLQ_VERSION,
                "queue": self.config.name,
                "task_id": self._stats.received,
                "key": msg.topic,
                "payload": msg.payload,
                "reason": reason,
                "error_type": type(exc).__name__ if exc is not None else None,
                "error_message": str(exc) if exc is not None else
                f"no inbound route maps {msg.topic!r}",
                "traceback": "".join(traceback.format_exception(exc)) if exc else None,
                "deliveries": 1,
                "history": [],
                "dead_at": now,
                "producer": self.node.id,
                # Bridge-specific facts (ignored by readers that do not know them):
                "bridge": self.config.name,
                "topic": msg.topic,
                "attrs": [list(a) for a in msg.attrs],
                "content_type": msg.content_type,
            }
            self._dlq.append(msgpack.packb(rec, use_bin_type=True))
            self._dlq.flush()
        self._stats.dead_lettered += 1
        _log.warning("bridge %s: dead-lettered a message on %s: %s (%s)", self.config.name,
                     msg.topic, reason, exc)
