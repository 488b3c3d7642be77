"""Child process for the pub/sub kill tests (run with ``python tests/pubsub_child.py MODE ...``).

Modes:
  pub DATA_DIR MESH PEER STREAM START N
      publish N events (data = START+i) one publish() at a time, print "ACK <seq>" after each
      returned, then "DONE" and serve replays until stdin closes.
  sub DATA_DIR MESH PEER TOPIC NAME N OUT
      durable subscriber NAME; append "<id> <seq> <data>\\n" to OUT for each event (one
      os.write, so a SIGKILL never tears a line), commit every 0.1 s, exit 0 once it handled
      the event with seq N-1 (or at once when its cursor is already past it).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.node import Node
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber


def node(data_dir: str, mesh: str, peer: str) -> Node:
    return Node(data_dir=data_dir, name=f"child-{os.getpid()}", mesh=mesh, mdns=False,
                interface="127.0.0.1", static_peers=(peer,))


def pub(data_dir: str, mesh: str, peer: str, stream: str, start: str, n: str) -> None:
    with node(data_dir, mesh, peer) as nd, Publisher(nd, stream, heartbeat_s=0.1) as p:
        base = int(start)
        for i in range(int(n)):
            seq = p.publish(base + i, type="tick")
            sys.stdout.write(f"ACK {seq}\n")
        sys.stdout.write("DONE\n")
        sys.stdin.read()


def sub(data_dir: str, mesh: str, peer: str, topic: str, name: str, n: str, out: str) -> None:
    last = int(n) - 1
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with node(data_dir, mesh, peer) as nd, Subscriber(
            nd, topic, durable=name, start=Start.beginning(), commit_interval_s=0.1) as s:
        # A predecessor may have committed past the last event and been killed on its way out
        # (after commit(), before exiting): nothing is left to deliver, so do not wait for it.
        done = any(pos > last for pos in s.positions().values())
        for ev in () if done else s:
            os.write(fd, f"{ev.id} {ev.seq} {ev.data}\n".encode())
            if ev.seq == last:
                s.commit()
                break
    os.close(fd)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"pub": pub, "sub": sub}[mode](*rest)
