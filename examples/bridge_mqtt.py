"""Bridge a mesh stream to an MQTT broker and commands back, with store-and-forward across a
broker restart.

    python -m examples.bridge_mqtt                  # starts its own mosquitto (if installed)
    python -m examples.bridge_mqtt --port 1883      # or uses a broker you run

Needs ``pip install 'zeromesh[mqtt]'``. A sensor node publishes readings on
``sensors.kitchen``; a gateway node runs the bridge, which forwards them to
``site/sensors/kitchen`` (QoS 1; the bridge's cursor moves only after the broker's PUBACK) and
brings ``site/cmd/kitchen`` messages into the mesh stream ``cmd.kitchen``.

With its own broker the example also stops the broker mid-run: readings published meanwhile
wait in the sensor's log and reach the broker once it is back, none lost. With no broker
reachable it says so within a few seconds and exits 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mesh.node import Node
from patterns.bridge import Bridge, BridgeConfig, MqttConfig, Route
from patterns.pubsub import Publisher, Subscriber


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_broker(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    return subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _until(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # a demo's progress poll
    return True


def _mqtt_publish(host: str, port: int, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(host, port)
    c.loop_start()
    c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None,
                    help="an MQTT broker's port (default: start a mosquitto of our own)")
    ap.add_argument("--count", type=int, default=10, help="readings before and during the "
                    "broker's restart")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bridge-example-"))
    broker = None
    port = args.port
    if port is None:
        if shutil.which("mosquitto") is None:
            print("no --port given and no mosquitto installed: start a broker and pass --port",
                  file=sys.stderr)
            return 1
        port = _free_port()
        broker = _start_broker(port, root)
    try:
        with Node(data_dir=root / "sensor", mesh="example", mdns=False,
                  interface="127.0.0.1") as sensor:
            ctrl = next(e for e in sensor.info().endpoints["control"] if e.startswith("tcp"))
            cfg = BridgeConfig(
                name="site", kind="mqtt", mqtt=MqttConfig(host=args.host, port=port),
                routes=(Route("sensors.*", "site/sensors/+", "out", "mqtt"),
                        Route("cmd.*", "site/cmd/+", "in", "mqtt")))
            with Node(data_dir=root / "gateway", mesh="example", mdns=False,
                      interface="127.0.0.1", static_peers=(ctrl,)) as gw, \
                    Bridge(gw, cfg) as bridge, Publisher(sensor, "sensors.kitchen") as pub, \
                    Subscriber(sensor, "cmd.kitchen") as commands:
                if not _until(lambda: bridge.stats().connected, 5):
                    print(f"no MQTT broker answers at {args.host}:{port}", file=sys.stderr)
                    return 1
                for i in range(args.count):
                    pub.publish({"celsius": 20 + i / 10}, type="reading")
                if not _until(lambda: bridge.stats().forwarded >= args.count, 30):
                    print(f"only {bridge.stats().forwarded} of {args.count} forwarded",
                          file=sys.stderr)
                    return 1
                print(f"outbound: {args.count} readings on site/sensors/kitchen, each acked "
                      "by the broker")
                total = args.count
                if broker is not None:  # store-and-forward across a broker restart
                    broker.terminate()
                    broker.wait(10)
                    _until(lambda: not bridge.stats().connected, 10)
                    for i in range(args.count):
                        pub.publish({"celsius": 30 + i / 10}, type="reading")
                    total += args.count
                    held = total - bridge.stats().forwarded
                    broker = _start_broker(port, root)
                    if not _until(lambda: bridge.stats().forwarded >= total, 30):
                        print(f"after the restart only {bridge.stats().forwarded} of {total} "
                              "forwarded", file=sys.stderr)
                        return 1
                    print(f"broker restart: {held} readings published while it was down were "
                          f"forwarded once it came back ({total} of {total}, none lost)")
                _mqtt_publish(args.host, port, "site/cmd/kitchen",
                              json.dumps({"fan": "on"}).encode())
                got = None
                deadline = time.monotonic() + 15
                while got is None and time.monotonic() < deadline:
                    got = commands.recv(timeout=0.2)
                if got is None:
                    print("the MQTT command never reached the mesh", file=sys.stderr)
                    return 1
                print(f"inbound: site/cmd/kitchen -> mesh stream {got.stream}: {got.data!r}")
                print(f"bridge counters: {bridge.stats()}")
        return 0
    finally:
        if broker is not None and broker.poll() is None:
            broker.terminate()
            broker.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
