"""Peer-to-peer services with failover: two responders, one stops, calls keep working.

    python examples/p2p_failover.py

Two nodes offer the "quote" service; a client node calls it by name (no address). The client
picks a live responder for each call; then one responder stops and later calls go to the other
one. The caller sees no error: a request to a responder that went silent is retried on the
other (with the same request id, so a responder that already ran it answers from its reply
cache instead of running it twice).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.node import Node
from patterns.reqrep import Client, Incoming, Service


def main(tmp: str) -> None:
    with Node(data_dir=f"{tmp}/client", name="client", interface="127.0.0.1",
              mdns=False) as cnode:
        ep = cnode.info().endpoints["control"][0]
        responders = [Node(data_dir=f"{tmp}/r{i}", name=f"responder-{i}", interface="127.0.0.1",
                           mdns=False, static_peers=(ep,)) for i in (1, 2)]
        services = []
        for node in responders:
            def quote(req: Incoming, name: str = node.name) -> object:
                return {"symbol": req.payload, "price": 42.0, "by": name}
            services.append(Service(node, "quote", quote))
        deadline = time.monotonic() + 10
        while len(cnode.who_offers("service", "quote")) < 2:  # both discovered
            if time.monotonic() > deadline:
                raise SystemExit("responders not discovered")
            time.sleep(0.01)
        with Client(cnode, timeout=3.0, silent_s=0.5) as client:
            served = Counter(client.request("quote", "ZMQ")["by"] for _ in range(20))
            print("both up:", dict(served))

            services[0].close()  # responder-1 stops serving
            responders[0].close()
            served = Counter(client.request("quote", "ZMQ")["by"] for _ in range(20))
            print("after responder-1 stopped:", dict(served))
            assert set(served) == {"responder-2"}
        services[1].close()
        responders[1].close()
    print("every call answered")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(d)
