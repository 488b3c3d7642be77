"""Durable pub/sub between two nodes in one process (run: python -m examples.pubsub_basic)."""

from __future__ import annotations

import tempfile

from mesh.node import Node
from patterns.pubsub import Publisher, Start, Subscriber


def main(d: str) -> None:
    a = Node(data_dir=f"{d}/a", name="sensor", mesh="demo", mdns=False, interface="127.0.0.1")
    ctrl = next(e for e in a.info().endpoints["control"] if e.startswith("tcp://"))
    b = Node(data_dir=f"{d}/b", name="agg", mesh="demo", mdns=False, interface="127.0.0.1",
             static_peers=(ctrl,))
    with a, b, Publisher(a, "sensors.temp") as pub:
        for i in range(5):
            pub.publish({"c": 20 + i}, type="reading")
        # A late joiner from the beginning, with a durable cursor named "agg".
        with Subscriber(b, "sensors.", start=Start.beginning(), durable="agg") as sub:
            for event in sub:
                print(event.stream, event.seq, event.data)
                if event.seq == 4:
                    break


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(tmp)
