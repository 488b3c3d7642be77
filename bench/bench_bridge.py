"""Bridge throughput: mesh -> MQTT (mosquitto) and mesh -> NATS JetStream, live and backlog.

Each bridge figure is printed beside the broker's own client publishing the same messages
directly with the same acknowledgement rule (MQTT QoS 1 PUBACK / JetStream PubAck, same
in-flight window): that is the ceiling a bridge can reach, so the ratio says what the mesh
side (durable subscriber, mapping, cursor commit per batch) costs.

* live: the bridge is connected; a publisher on another node publishes N events (100 B data)
  as fast as it can; time from the first publish until the broker acked the N-th event.
* backlog: the broker is stopped, N events are published (they wait in the log), the broker is
  started; time from the bridge's reconnection until the N-th ack (the drain rate after an
  outage; the reconnect delay itself is reported apart).

    python bench/bench_bridge.py --quick      # < 1 min: 5k events per cell
    python bench/bench_bridge.py              # 30k events per cell

Needs mosquitto and nats-server on PATH (apt-get install -y mosquitto nats-server) and the
extras (pip install 'zeromesh[mqtt,nats]'). Brokers run on free loopback ports in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAYLOAD = {"v": "x" * 90}  # ~100 B of data


def _wait(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met")
        time.sleep(0.002)


def ceiling_mqtt(port: int, n: int, chunk_size: int, window: int = 1000) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from mesh.envelope import Event
    from patterns.bridge.mapping import event_to_message

    msgs = [event_to_message(Event(type="r", source="s", data=PAYLOAD), "ceil/a", kind="mqtt",
                             mode="binary", origin="o") for _ in range(n)]
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                    client_id="ceiling", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(window)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    # paho slows down with tens of thousands of messages queued at once, so the client is
    # given `chunk` messages at a time (each chunk acked before the next, like the bridge),
    # and the better of that and all-at-once is the ceiling.
    best = 0.0
    for chunk in (n, chunk_size):
        t0 = time.monotonic()
        for s in range(0, n, chunk):
            infos = []
            for m in msgs[s:s + chunk]:
                p = Properties(PacketTypes.PUBLISH)
                p.UserProperty = list(m.attrs)
                infos.append(c.publish(m.topic, m.payload, qos=1, properties=p))
            for i in infos:
                i.wait_for_publish(60)
        best = max(best, n / (time.monotonic() - t0))
    c.disconnect()
    c.loop_stop()
    return best


def ceiling_nats(port: int, n: int, batch: int) -> float:
    import nats

    from mesh.envelope import Event
    from patterns.bridge.mapping import event_to_message

    msgs = [event_to_message(Event(type="r", source="s", data=PAYLOAD), "ceil.a", kind="nats",
                             mode="binary", origin="o") for _ in range(n)]

    async def run() -> float:
        from nats.js.api import StreamConfig
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="CEIL", subjects=["ceil.>"],
                                         duplicate_window=120))
        t0 = time.monotonic()
        for i in range(0, n, batch):
            chunk = msgs[i:i + batch]
            await asyncio.gather(*[js.publish(m.topic, m.payload, headers={
                **dict(m.attrs), "Nats-Msg-Id": str(i + k)}) for k, m in enumerate(chunk)])
        dt = time.monotonic() - t0
        await nc.close()
        return n / dt

    return asyncio.run(run())


def bridge_run(kind: str, broker: Any, root: Path, n: int, batch: int, outage: bool
               ) -> tuple[float, float]:
    """Returns (events/s, reconnect seconds or 0)."""
    from mesh.envelope import Event
    from mesh.node import Node
    from patterns.bridge import Bridge, BridgeConfig, MqttConfig, NatsConfig, Route
    from patterns.pubsub import Publisher

    tag = f"{kind}-{'backlog' if outage else 'live'}"
    mesh = f"bench-{os.getpid()}-{tag}"
    a = Node(data_dir=root / f"{tag}-pub", mesh=mesh, mdns=False, interface="127.0.0.1")
    actrl = next(e for e in a.info().endpoints["control"] if e.startswith("tcp://"))
    b = Node(data_dir=root / f"{tag}-br", mesh=mesh, mdns=False, interface="127.0.0.1",
             static_peers=(actrl,))
    remote = f"{tag}/#" if kind == "mqtt" else f"{tag}.>"
    cfg = BridgeConfig(name=tag, kind=kind,  # type: ignore[arg-type]
                       routes=(Route(f"{tag}.>", remote, "out", kind),),  # type: ignore[arg-type]
                       mqtt=MqttConfig(port=broker.port),
                       nats=NatsConfig(servers=(f"nats://127.0.0.1:{broker.port}",),
                                       stream=f"S{os.getpid()}{tag.replace('-', '')}"),
                       batch=batch, ack_timeout_s=10, retry_s=0.05)
    events = [Event(type="r", source="s", data=PAYLOAD) for _ in range(n)]
    try:
        with Publisher(a, f"{tag}.x") as pub, Bridge(b, cfg) as br:
            _wait(lambda: br.stats().connected, 20)
            # Warm-up: one event through, so the subscription is wired before timing.
            pub.publish_event(Event(type="w", source="s"))
            _wait(lambda: br.stats().forwarded >= 1, 20)
            reconnect = 0.0
            if outage:
                broker.stop()
                for i in range(0, n, 1000):
                    pub.publish_events(events[i:i + 1000])
                t_up = time.monotonic()
                broker.start()
                _wait(lambda: br.stats().connected, 30)
                t0 = time.monotonic()
                reconnect = t0 - t_up
            else:
                t0 = time.monotonic()
                for i in range(0, n, 1000):
                    pub.publish_events(events[i:i + 1000])
            _wait(lambda: br.stats().forwarded >= n + 1, 300)
            dt = time.monotonic() - t0
    finally:
        b.close()
        a.close()
    return n / dt, reconnect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    n = args.n or (5000 if args.quick else 30000)
    from tests.brokers import start_mosquitto, start_nats

    root = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    rows = []
    try:
        for kind, starter in (("mqtt", start_mosquitto), ("nats", start_nats)):
            broker = starter(root / kind)
            try:
                ceil = (ceiling_mqtt(broker.port, n, args.batch) if kind == "mqtt"
                        else ceiling_nats(broker.port, n, args.batch))
                live, _ = bridge_run(kind, broker, root, n, args.batch, outage=False)
                back, rec = bridge_run(kind, broker, root, n, args.batch, outage=True)
            finally:
                broker.stop()
            rows.append((kind, ceil, live, back, rec))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{n} events of ~100 B data per cell, bridge batch {args.batch}\n")
    print("| target | broker client direct (ceiling) | bridge live | ratio | backlog drain "
          "after outage | ratio | reconnect |")
    print("|---|---|---|---|---|---|---|")
    for kind, ceil, live, back, rec in rows:
        name = "MQTT (mosquitto, QoS 1)" if kind == "mqtt" else "NATS JetStream (PubAck)"
        print(f"| {name} | {ceil:,.0f}/s | {live:,.0f}/s | {live / ceil:.2f}x | "
              f"{back:,.0f}/s | {back / ceil:.2f}x | {rec:.1f} s |")


if __name__ == "__main__":
    main()
