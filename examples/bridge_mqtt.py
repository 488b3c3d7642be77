"""Bridge a mesh stream to an MQTT broker and commands back, with store-and-forward.

Needs a broker (``mosquitto -p 1883``) and ``pip install 'zeromesh[mqtt]'``::

    python examples/bridge_mqtt.py --port 1883

A sensor node publishes readings on ``sensors.<room>``; a gateway node runs the bridge, which
forwards them to ``site/sensors/<room>`` (QoS 1, committed only after the PUBACK: stop the broker
and start it again, nothing is lost) and brings ``site/cmd/<room>`` messages into the mesh
stream ``cmd.<room>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.node import Node
from patterns.bridge import Bridge, BridgeConfig, MqttConfig, Route
from patterns.pubsub import Publisher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--count", type=int, default=20)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bridge-example-")
    with Node(data_dir=os.path.join(root, "sensor"), mesh="example", mdns=False,
              interface="127.0.0.1") as sensor:
        ctrl = next(e for e in sensor.info().endpoints["control"] if e.startswith("tcp://"))
        cfg = BridgeConfig(
            name="site", kind="mqtt", mqtt=MqttConfig(host=args.host, port=args.port),
            routes=(Route("sensors.*", "site/sensors/+", "out", "mqtt"),
                    Route("cmd.*", "site/cmd/+", "in", "mqtt")))
        with Node(data_dir=os.path.join(root, "gateway"), mesh="example", mdns=False,
                  interface="127.0.0.1", static_peers=(ctrl,)) as gw, \
                Bridge(gw, cfg) as bridge, Publisher(sensor, "sensors.kitchen") as pub:
            for i in range(args.count):
                pub.publish({"celsius": 20 + i / 10}, type="reading")
            deadline = time.monotonic() + 30
            while bridge.stats().forwarded < args.count and time.monotonic() < deadline:
                time.sleep(0.1)  # a demo's progress poll
            print(f"forwarded to MQTT: {bridge.stats()}")


if __name__ == "__main__":
    main()
