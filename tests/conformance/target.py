"""The zeromesh node the conformance kit drives by default (``python -m tests.conformance.target``).

It starts a node (mesh ``conformance``, loopback, no mDNS) offering:

* the service ``echo``, whose handler answers ``<payload>#<runs>`` (runs counts handler runs,
  so a retry served from the cache is visible);
* the durable stream ``conf`` holding three events (seqs 0..2) and the durable stream ``live``
  (empty at start, published on the ``publish`` command);
* the work queue ``jobs`` (ack_wait 0.5 s) holding the tasks ``t0``..``t4``;
* a subscriber of the stream ``kitfeed`` (start: beginning), which the kit publishes.

It prints one JSON line ``{"control": <tcp control endpoint>, "id": <node id>, "commands":
[...]}`` and then reads commands from stdin, one a line, each answered by one JSON line:

* ``stats``: ``node.stats()`` (without ``metrics``) plus the patterns' counters under
  ``publisher``, ``subscriber``, ``queue`` and ``service``;
* ``publish <stream> <n>``: publishes ``n`` events (data: the ints ``0..n-1``) on ``conf`` or
  ``live``; answers ``{"head": <next seq>}``;
* ``received``: what the ``kitfeed`` subscriber delivered, ``{"events": [[stream, seq, data
  (hex of bytes, else the value), type, source], ...], "gaps": <typed gap notices>}``.

End of input closes the node. Another implementation's target prints the same first line and
lists in ``commands`` the commands it answers (see tests/conformance/README.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import threading
from typing import Any

from mesh.node import Node
from patterns.pipeline import DispatchConfig, WorkQueue
from patterns.pubsub import Publisher, Start, Subscriber
from patterns.reqrep import Service


class _Feed:
    """The ``kitfeed`` subscriber, read on its own thread."""

    def __init__(self, node: Node) -> None:
        self.sub = Subscriber(node, "kitfeed", start=Start.beginning())
        self.lock = threading.Lock()
        self.events: list[list[Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kitfeed", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            ev = self.sub.recv(timeout=0.05)
            if ev is None:
                continue
            data = ev.data.hex() if isinstance(ev.data, bytes) else ev.data
            with self.lock:
                self.events.append([ev.stream, ev.seq, data, ev.type, ev.source])

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"events": list(self.events), "gaps": len(self.sub.gaps())}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sub.close()


def main() -> None:
    """Run the target until stdin closes."""
    runs = [0]

    def echo(req: object) -> bytes:
        runs[0] += 1
        return bytes(req.payload) + f"#{runs[0]}".encode()  # type: ignore[attr-defined]

    with tempfile.TemporaryDirectory() as d:
        node = Node(data_dir=d, name="target", mesh="conformance", interface="127.0.0.1",
                    mdns=False)
        try:
            with Service(node, "echo", echo, outcome_log=False) as svc, \
                    Publisher(node, "conf") as pub, Publisher(node, "live") as live:
                pubs = {"conf": pub, "live": live}
                for i in range(3):
                    pub.publish(i)
                queue = WorkQueue(node, "jobs",
                                  config=DispatchConfig(ack_wait=0.5, max_deliveries=5))
                for payload in (b"t0", b"t1", b"t2", b"t3", b"t4"):
                    queue.push(payload)
                feed = _Feed(node)
                try:
                    ep = next(e for e in node.info().endpoints["control"]
                              if e.startswith("tcp"))
                    print(json.dumps({"control": ep, "id": node.id,
                                      "commands": ["stats", "publish", "received"]}),
                          flush=True)
                    for line in sys.stdin:
                        words = line.split()
                        out: Any = {"error": "unknown command"}
                        if words == ["stats"]:
                            out = {k: v for k, v in node.stats().items() if k != "metrics"}
                            out["publisher"] = dataclasses.asdict(pub.stats())
                            out["subscriber"] = dataclasses.asdict(feed.sub.stats())
                            out["queue"] = queue.stats()
                            out["service"] = dataclasses.asdict(svc.stats())
                        elif len(words) == 3 and words[0] == "publish" and words[1] in pubs:
                            p = pubs[words[1]]
                            p.publish_many(list(range(int(words[2]))))
                            out = {"head": p.stats().head}
                        elif words == ["received"]:
                            out = feed.report()
                        print(json.dumps(out, default=str), flush=True)
                finally:
                    feed.close()
        finally:
            node.close()


if __name__ == "__main__":
    main()
