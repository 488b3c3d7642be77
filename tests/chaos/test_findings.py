"""Minimal reproductions of what the chaos runs found in code this suite does not own.

Each is ``xfail(strict=True)``: it fails today, and turns into an error the day it is fixed
(then drop the mark). Details: /work/briefs/requests-chaos.md.
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
@pytest.mark.xfail(strict=True, reason="a restarted publisher never learns the position of a "
                   "caught-up durable subscriber: the subscriber sends pubsub.ack only when "
                   "its position changes (Subscriber._commit_positions), so Publisher.stats()"
                   ".lag stays {} until new events flow (chaos seed 202)")
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
