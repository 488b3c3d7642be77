"""The zeromesh node the conformance kit drives by default (``python -m tests.conformance.target``).

It starts a node (mesh ``conformance``, loopback, no mDNS) offering the service ``echo``
and the durable stream ``conf`` holding three events (seqs 0..2), and the work queue ``jobs``
(ack_wait 0.5 s) holding the tasks ``t0``..``t4``,
whose handler answers ``<payload>#<runs>`` (runs counts handler runs, so a retry served from
the cache is visible), prints one JSON line ``{"control": <tcp control endpoint>, "id": <node
id>}`` and then reads stdin: ``stats`` prints ``node.stats()`` as one JSON line; end of input
closes the node. Another implementation's target prints the same first line.
"""

from __future__ import annotations

import json
import sys
import tempfile

from mesh.node import Node
from patterns.pipeline import DispatchConfig, WorkQueue
from patterns.pubsub import Publisher
from patterns.reqrep import Service


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
            with Service(node, "echo", echo, outcome_log=False), \
                    Publisher(node, "conf") as pub:
                for i in range(3):
                    pub.publish(i)
                queue = WorkQueue(node, "jobs",
                                  config=DispatchConfig(ack_wait=0.5, max_deliveries=5))
                for payload in (b"t0", b"t1", b"t2", b"t3", b"t4"):
                    queue.push(payload)
                ep = next(e for e in node.info().endpoints["control"] if e.startswith("tcp"))
                print(json.dumps({"control": ep, "id": node.id}), flush=True)
                for line in sys.stdin:
                    if line.strip() == "stats":
                        print(json.dumps(node.stats(), default=str), flush=True)
        finally:
            node.close()


if __name__ == "__main__":
    main()
