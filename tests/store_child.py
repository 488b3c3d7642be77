"""Child process for the replicated-stream tests (``python tests/store_child.py MODE ...``).

Modes:
  store DATA_DIR MESH PEER TOPIC
      run a Store of TOPIC (env STORE_MAX_BYTES / STORE_SEGMENT_BYTES: size retention); print "READY <node id>", then "HOLD <origin> <stream> <head>" each
      time a replica's head moved (at most every 0.05 s); serve until stdin closes or killed.
  pub DATA_DIR MESH PEER STREAM START N REPLICAS BATCH
      Publisher(replicas=REPLICAS): publish N events (data = START+i) in publish_many calls of
      BATCH; print "ACK <last seq>" after each returned (the stores hold it), then "DONE" and
      serve until stdin closes.
  sub DATA_DIR MESH PEER TOPIC NAME LAST OUT
      durable subscriber NAME from the beginning; append "<id> <seq> <data>\\n" to OUT for each
      event (one os.write), exit 0 once it handled seq LAST.
All nodes use a fast presence (a killed peer is LEFT within about a second).
"""

from __future__ import annotations

import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.log import LogConfig, Retention
from mesh.node import Node, PresenceConfig
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import Store
from patterns.pubsub.subscriber import Start, Subscriber

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


def node(data_dir: str, mesh: str, peer: str) -> Node:
    return Node(data_dir=data_dir, name=f"child-{os.getpid()}", mesh=mesh, mdns=False,
                interface="127.0.0.1", static_peers=(peer,), presence=PRESENCE)


def _store_config() -> LogConfig | None:
    """``STORE_MAX_BYTES`` / ``STORE_SEGMENT_BYTES``: the replicas' size retention."""
    cap = os.environ.get("STORE_MAX_BYTES")
    if cap is None:
        return None
    return LogConfig(segment_bytes=int(os.environ.get("STORE_SEGMENT_BYTES", 1 << 20)),
                     retention=Retention(max_bytes=int(cap)))


def store(data_dir: str, mesh: str, peer: str, topic: str) -> None:
    with node(data_dir, mesh, peer) as nd, Store(nd, topics=(topic,),
                                                 log_config=_store_config()) as st:
        sys.stdout.write(f"READY {nd.id}\n")
        sys.stdout.flush()
        seen: dict[tuple[str, str], int] = {}
        stdin = sys.stdin.buffer
        while True:
            for h in st.holdings():
                if seen.get((h.origin, h.stream)) != h.head:
                    seen[(h.origin, h.stream)] = h.head
                    sys.stdout.write(f"HOLD {h.origin} {h.stream} {h.head}\n")
                    sys.stdout.flush()
            # Wait for stdin to close (the test is done), reporting holdings between waits.
            if select.select([stdin], [], [], 0.05)[0] and os.read(stdin.fileno(), 4096) == b"":
                return


def pub(data_dir: str, mesh: str, peer: str, stream: str, start: str, n: str, replicas: str,
        batch: str) -> None:
    with node(data_dir, mesh, peer) as nd, Publisher(nd, stream, heartbeat_s=0.1,
                                                     replicas=int(replicas),
                                                     replica_timeout_s=30.0) as p:
        sys.stdout.write(f"HEAD {p.head} {p.stats().epoch}\n")
        base, total, size = int(start), int(n), int(batch)
        for i in range(0, total, size):
            seqs = p.publish_many([base + j for j in range(i, min(total, i + size))],
                                  type="tick")
            sys.stdout.write(f"ACK {seqs[-1]}\n")
            sys.stdout.flush()
        sys.stdout.write("DONE\n")
        sys.stdout.flush()
        sys.stdin.read()


def sub(data_dir: str, mesh: str, peer: str, topic: str, name: str, last: str,
        out: str) -> None:
    stop = int(last)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with node(data_dir, mesh, peer) as nd, Subscriber(
            nd, topic, durable=name, start=Start.beginning(), commit_interval_s=0.1) as s:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = s.recv(timeout=0.1)
            if ev is None:
                continue
            os.write(fd, f"{ev.id} {ev.seq} {ev.data}\n".encode())
            if ev.seq == stop:
                s.commit()
                break
    os.close(fd)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"store": store, "pub": pub, "sub": sub}[mode](*rest)
