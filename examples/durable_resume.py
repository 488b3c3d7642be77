"""A durable subscription that resumes after a restart, even after kill -9.

    python -m examples.durable_resume

A consumer *process* reads a stream through the durable subscription "billing" and is killed
with SIGKILL part-way. Restarted with the same data directory, it resumes from its last
committed position: at-least-once delivery, so the events after the last commit (here every 25 events)
come again, and :class:`~patterns.pubsub.Dedup` (keyed by event id) drops those duplicates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mesh.node import Node
from patterns.pubsub import Publisher

N = 200


def consumer(data_dir: str, publisher_ep: str, out_path: str, die_after: int) -> None:
    from patterns.pubsub import Subscriber

    with Node(data_dir=data_dir, name="billing", interface="127.0.0.1", mdns=False,
              static_peers=(publisher_ep,)) as node, \
            Subscriber(node, "invoices", durable="billing") as sub, \
            open(out_path, "a") as out:
        for n, event in enumerate(sub, 1):
            out.write(f"{event.id} {event.seq}\n")
            out.flush()
            if n % 25 == 0:
                sub.commit()  # past this event: a crash from here on replays at most 24
            if n == die_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash, no goodbye, no final commit
            if event.seq == N - 1:
                break


def main(tmp: str) -> None:
    out = f"{tmp}/seen.txt"
    with Node(data_dir=f"{tmp}/pub", interface="127.0.0.1", mdns=False) as node, \
            Publisher(node, "invoices") as pub:
        ep = node.info().endpoints["control"][0]
        pub.publish_many([{"invoice": i} for i in range(N)])
        args = [sys.executable, "-m", __spec__.name if __spec__ else "examples.durable_resume", "consumer", f"{tmp}/consumer", ep, out]
        first = subprocess.run([*args, "120"], timeout=60)
        print("consumer killed:", first.returncode == -signal.SIGKILL)
        second = subprocess.run([*args, "0"], timeout=60)
        assert second.returncode == 0
    lines = Path(out).read_text().split()
    ids, seqs = lines[0::2], [int(s) for s in lines[1::2]]
    from patterns.pubsub import Dedup

    dedup = Dedup()
    unique_seqs = [s for i, s in zip(ids, seqs, strict=True) if dedup.first_time(i)]
    print(f"received {len(seqs)} deliveries, {len(seqs) - len(unique_seqs)} duplicates "
          f"after the crash, {len(unique_seqs)} distinct events")
    assert unique_seqs == list(range(N)), "an event was lost"
    print("resumed after kill -9 without losing an event")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "consumer":
        consumer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
