"""Minimal reproductions of what the chaos runs found, kept as regression tests once fixed.

- A publisher restarted on the same log never learnt the position of a durable subscriber that
  was already caught up (acks were sent only when a position changed; chaos seed 202). Fixed:
  the subscriber re-acks its committed positions when a publisher joins or changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.node import Node
from patterns.pubsub import Publisher, Start, Subscriber
from tests.util import unique, wait_until


def _node(path: Path, mesh: str, peers: tuple[str, ...] = ()) -> Node:
    return Node(data_dir=path, name=path.name, mesh=mesh, mdns=False, interface="127.0.0.1",
                transports=("tcp",), static_peers=peers)


@pytest.mark.timeout(30)
def test_restarted_publisher_learns_caught_up_subscriber_position(tmp_path: Path) -> None:
    mesh = unique("cf")
    with _node(tmp_path / "sub", mesh) as sn:
        ctrl = next(e for e in sn.info().endpoints["control"] if e.startswith("tcp://"))
        with Subscriber(sn, "cf.s", durable="d", start=Start.beginning(),
                        commit_interval_s=0.1) as sub:
            with _node(tmp_path / "pub", mesh, (ctrl,)) as pn, Publisher(pn, "cf.s") as pub:
                pub.publish_many(range(10))
                got = []
                wait_until(lambda: got.extend(sub.recv_batch(timeout=0.1)) or len(got) >= 10,
                           10, what="all 10 events")
                sub.commit()
                wait_until(lambda: pub.stats().lag.get("d") == 0, 10, what="lag 0 before")
            # Same data directory: the publisher restarts with its log (head 10).
            with _node(tmp_path / "pub", mesh, (ctrl,)) as pn, Publisher(pn, "cf.s") as pub:
                assert pub.head == 10
                wait_until(lambda: pub.stats().lag.get("d") == 0, 8,
                           what="restarted publisher sees the subscriber at lag 0")
