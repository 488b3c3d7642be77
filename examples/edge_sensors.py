"""Edge sensors: store and forward while the consumer is away, then catch up.

    python -m examples.edge_sensors

A sensor node keeps publishing readings to its durable log whether or not anyone listens. The
aggregator (a durable subscription named "agg") reads a few, goes away (its node is closed, as
if the uplink or the gateway were down), the sensor keeps publishing, and when the aggregator
comes back with the same data directory it resumes at its committed position and receives
every reading it missed, in order, from the sensor's log. Nothing is lost and nothing needs a
broker: the sensor is the store.
"""

from __future__ import annotations

import tempfile

from mesh.node import Node
from patterns.pubsub import Publisher, Start, Subscriber


def aggregator(data_dir: str, sensor_ep: str, want: int) -> list[int]:
    """Run the aggregator until it has ``want`` readings; return the seqs it got."""
    seqs: list[int] = []
    with Node(data_dir=data_dir, name="agg", interface="127.0.0.1", mdns=False,
              static_peers=(sensor_ep,)) as node, \
            Subscriber(node, "sensors.", durable="agg", start=Start.beginning()) as sub:
        for event in sub:  # the cursor is committed at close (auto commit)
            seqs.append(event.seq)
            if len(seqs) == want:
                break
    return seqs


def main(tmp: str) -> None:
    with Node(data_dir=f"{tmp}/sensor", name="sensor-1", interface="127.0.0.1",
              mdns=False) as sensor, Publisher(sensor, "sensors.temp") as pub:
        ep = sensor.info().endpoints["control"][0]
        for i in range(5):
            pub.publish({"c": 20.0 + i / 10}, type="reading")
        first = aggregator(f"{tmp}/agg", ep, 5)
        print("aggregator online, got seqs", first)

        # The aggregator is away: readings go on into the sensor's log.
        for i in range(5, 15):
            pub.publish({"c": 20.0 + i / 10}, type="reading")
        print("sensor stored 10 readings while the aggregator was away; head =", pub.head)

        rest = aggregator(f"{tmp}/agg", ep, 10)
        print("aggregator back, caught up with seqs", rest)
        assert first + rest == list(range(15)), "a reading was lost or duplicated"
        print("all 15 readings delivered, in order")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(d)
